"""Fault-injection, fuzz and scale tests (`make test-chaos`)."""
