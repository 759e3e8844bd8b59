"""Tests of fedsb's local MQTT brokers against real brokers (amqtt in-process, mosquitto)."""
