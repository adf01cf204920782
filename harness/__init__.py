"""harness: compile and measure dsnet routes on target profiles (backends, protocol, LUT, reports).

Importing this package never imports an optional heavy backend (TVM, TensorRT, ONNX Runtime).
"""
