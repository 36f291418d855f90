"""GPTQ 4-bit: the checkpoint format, quantised linears and their kernels, quantisation."""
