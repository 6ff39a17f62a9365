"""qat: quantization-aware training and integer-only inference for accuracy-latency studies."""
