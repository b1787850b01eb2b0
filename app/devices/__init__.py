"""Devices: enrolment, broker identity, presence."""
