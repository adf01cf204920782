"""Dynamic deployment: the compiled dynamic engine (``engine``) and the latency LUT (``lut``)."""
