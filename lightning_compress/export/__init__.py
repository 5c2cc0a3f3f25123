"""Export: the int8 QDQ ONNX file of a quantization-aware model, verified in ONNX Runtime."""
