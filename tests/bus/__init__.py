"""Tests of the NATS bus (pipeline.bus)."""
