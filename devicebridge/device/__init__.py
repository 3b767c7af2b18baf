"""A device: its live session (connection states, commands, ordered telemetry, reconnects)
over a transport (BLE through bleak, or serial), and the device-program transfer."""
