"""The Raspberry Pi's code: MQTT wiring and the alarm. Imports neither NumPy, TensorFlow nor OpenVINO."""
