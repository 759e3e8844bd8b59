"""Real-broker fixtures of tests/mqtt, reused by the transport tests of the federated init."""

from mqtt.conftest import broker_dir, mosquitto_broker  # noqa: F401 - fixtures reused here
