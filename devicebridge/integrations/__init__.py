"""What the bridge talks to besides its devices: the MQTT broker and Home Assistant."""
