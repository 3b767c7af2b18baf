"""How a simulated device reaches a host: in-process (a bleak backend), a pty, TCP, or
virtual Bluetooth controllers (link level)."""
