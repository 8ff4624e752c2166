"""Building blocks of MemoryMamba with VMamba's parameter names: SS2D, MemSS2D, the Mem-SSM block."""
from memorymamba.nn.block import MemSSMBlock
from memorymamba.nn.layers import DropPath, LayerNorm2d, Linear2d, Mlp
from memorymamba.nn.memory import SIMILARITIES, MemoryNetwork
from memorymamba.nn.ss2d import BlockAux, MemSS2D, SS2D

__all__ = ["SS2D", "MemSS2D", "MemSSMBlock", "MemoryNetwork", "BlockAux", "SIMILARITIES",
           "LayerNorm2d", "Linear2d", "Mlp", "DropPath"]
