"""MemoryMamba: a memory-augmented visual state space model with fused kernels for its block."""
__version__ = "0.1.0"

from memorymamba.checkpoint import LoadReport, load_vmamba_checkpoint
from memorymamba.losses import MemoryMambaLoss
from memorymamba.model import MemoryAux, MemoryMamba, create_model, list_models
