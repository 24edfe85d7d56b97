"""Post-training and quantization-aware quantization (NNCF, ONNX Runtime QDQ).

Not implemented yet: tracked by the CPU-deployment issue. Until then no target accepts
``precision="int8"``, and asking for it is a ``ConfigError`` naming the supported precisions.
"""
