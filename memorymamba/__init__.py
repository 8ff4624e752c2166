"""MemoryMamba: a memory-augmented visual state space model with fused kernels for its block."""
__version__ = "0.1.0"
