"""The edge box's code: the inference engine, OpenVINO compilation, the HTTP API. Never imports
idc.training; serving an IR needs no TensorFlow."""
