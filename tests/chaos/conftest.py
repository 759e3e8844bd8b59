"""Fixtures of the chaos tests: the real-broker fixtures of tests/mqtt."""

from __future__ import annotations

from mqtt.conftest import broker_dir, require_mosquitto  # noqa: F401 - fixtures reused here
