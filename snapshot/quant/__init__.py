"""Quantized weights in a snapshot: the stored format (format.py), and the converters that
write it from GGUF blocks, AWQ/GPTQ/compressed-tensors/FP8 checkpoints or bf16 weights."""
