"""Simulated devices: the firmware model of each kind, its ring buffer, hand and programs."""
