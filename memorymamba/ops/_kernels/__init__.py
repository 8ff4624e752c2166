"""torch.library custom ops over the compiled kernels (memorymamba._C), one module per op stem."""
