"""Model backends: eager torch, torch.compile, ONNX Runtime and TensorRT engines."""
