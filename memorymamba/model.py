"""The MemoryMamba classifier (VMamba v2 layout with Mem-SSM blocks) and its named configurations.

Layout and parameter names are VMamba's "vmambav2v" classification models (channel-first, ln2d):
  patch_embed.{0,2,5,7}      conv3x3/2 -> LN2d -> GELU -> conv3x3/2 -> LN2d  (the gaps are VMamba's
                             identity slots, kept so the indices match its checkpoints; conv_norm="bn",
                             nano's default, puts BatchNorm2d after this and the downsample convs)
  layers.{i}.blocks.{j}.*    MemSSMBlock (norm, op = SS2D [+ coarse_memory, fine_memory], norm2, mlp)
  layers.{i}.downsample.{1,3} conv3x3/2 -> LN2d between stages (none after the last)
  classifier.{norm,head}     LN2d -> global average pool -> Linear
With use_coarse_memory = use_fine_memory = use_fusion = False the parameter set is exactly VMamba's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from memorymamba.nn.block import MemSSMBlock
from memorymamba.nn.layers import LayerNorm2d, vmamba_init_weights
from memorymamba.nn.memory import SIMILARITIES, MemoryNetwork
from memorymamba.nn.ss2d import BlockAux, SS2D

BACKEND_CHOICES = (None, "torch", "cpu", "cuda")

# Memory defaults: the paper (Fig. 4) peaks at 4 coarse cells on Aluminum and sweeps 2..8; the fine
# network is meant to hold finer-grained patterns, so it gets the top of that range.
_MEMORY_DEFAULTS = dict(use_coarse_memory=True, use_fine_memory=True, use_fusion=True,
                        coarse_memory_size=4, fine_memory_size=8, similarity="cosine")
_COMMON = dict(num_classes=1000, in_chans=3, d_state=1, ssm_ratio=1.0, mlp_ratio=4.0, backend=None,
               conv_norm="ln2d", **_MEMORY_DEFAULTS)
CONV_NORMS = ("ln2d", "bn")
# VMamba v2 "s1l*" configs (DESIGN section 2); nano is ours: trains from scratch on 2 CPU cores at
# 64x64 in minutes. Its strided convs take BatchNorm: on the synthetic data (300 per class, 10 epochs)
# BN there reached 83.8% test, BN in the stem only 76.8%, and ln2d 72.2% even in 20 epochs; BN in the
# blocks as well added nothing (84.5%), so the blocks keep VMamba's ln2d.
_CONFIGS = {
    "memorymamba_nano": dict(_COMMON, dims=32, depths=(1, 1, 2, 1), drop_path_rate=0.05, conv_norm="bn"),
    "memorymamba_tiny": dict(_COMMON, dims=96, depths=(2, 2, 8, 2), drop_path_rate=0.2),
    "memorymamba_small": dict(_COMMON, dims=96, depths=(2, 2, 20, 2), drop_path_rate=0.3),
    "memorymamba_base": dict(_COMMON, dims=128, depths=(2, 2, 20, 2), drop_path_rate=0.5),
}


@dataclass
class MemoryAux:
    """Per-block outputs the memory losses need, from the same forward as the logits.

    blocks[k] is the BlockAux of the k-th Mem-SSM block (network order); its fields are None where
    that block's memory is off. `coarse` / `fine` iterate over the blocks that have them.
    """

    blocks: list[BlockAux] = field(default_factory=list)

    @property
    def coarse(self) -> list[torch.Tensor]:
        """h_c (B, c) of every block with a coarse memory."""
        return [b.coarse_logits for b in self.blocks if b.coarse_logits is not None]

    @property
    def fine(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z (B, D), proj(M_f_bar) (B, D)) of every block with a fine memory."""
        return [(b.pooled, b.fine_proj) for b in self.blocks if b.fine_proj is not None]


def _int_list(name: str, value, length: int | None = None) -> list[int]:
    items = list(value) if isinstance(value, (list, tuple)) else None
    if (items is None or not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items)
            or (length is not None and len(items) != length)):
        size = f"{length} " if length is not None else ""
        raise ValueError(f"{name} must be a list of {size}positive integers, got {value!r}")
    return items


def _validate(cfg: dict) -> dict:
    """Checked copy of a config; every error names the argument and the rule."""
    cfg = dict(cfg)
    depths = _int_list("depths", cfg["depths"])
    dims = cfg["dims"]
    if isinstance(dims, int) and not isinstance(dims, bool) and dims >= 1:
        dims = [dims * 2 ** i for i in range(len(depths))]
    else:
        dims = _int_list("dims", dims, len(depths))
    cfg["depths"], cfg["dims"] = depths, dims
    for name in ("num_classes", "in_chans", "d_state"):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name in ("coarse_memory_size", "fine_memory_size"):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1024:
            raise ValueError(f"{name} must be an integer in [1, 1024], got {v!r}")
    for name in ("ssm_ratio", "mlp_ratio"):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    v = cfg["drop_path_rate"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ValueError(f"drop_path_rate must be a number in [0, 1), got {v!r}")
    for name in ("use_coarse_memory", "use_fine_memory", "use_fusion"):
        if not isinstance(cfg[name], bool):
            raise ValueError(f"{name} must be True or False, got {cfg[name]!r}")
    if cfg["similarity"] not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {cfg['similarity']!r}")
    if cfg["backend"] not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {cfg['backend']!r}")
    if cfg["conv_norm"] not in CONV_NORMS:
        raise ValueError(f"conv_norm must be one of {CONV_NORMS}, got {cfg['conv_norm']!r}")
    for d in dims:
        if int(cfg["ssm_ratio"] * d) < 1:
            raise ValueError(f"ssm_ratio * dims must be >= 1 channel, got ssm_ratio={cfg['ssm_ratio']} dims={dims}")
    return cfg


class _Stage(nn.Module):
    """layers.{i}: blocks then an optional downsample (names as VMamba's stage Sequential)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class _Classifier(nn.Module):
    """classifier.{norm, head}: LN2d -> global average pool -> Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x).mean(dim=(2, 3)))


class MemoryMamba(nn.Module):
    """MemoryMamba classifier. Build it with `create_model(name, **overrides)`; the keyword arguments
    are the override names (see `create_model`)."""

    def __init__(self, *, num_classes: int, in_chans: int, dims, depths, d_state: int, ssm_ratio: float,
                 mlp_ratio: float, drop_path_rate: float, use_coarse_memory: bool, use_fine_memory: bool,
                 use_fusion: bool, coarse_memory_size: int, fine_memory_size: int, similarity: str,
                 backend: str | None = None, conv_norm: str = "ln2d"):
        super().__init__()
        cfg = _validate(dict(
            num_classes=num_classes, in_chans=in_chans, dims=dims, depths=depths, d_state=d_state,
            ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
            use_coarse_memory=use_coarse_memory, use_fine_memory=use_fine_memory, use_fusion=use_fusion,
            coarse_memory_size=coarse_memory_size, fine_memory_size=fine_memory_size,
            similarity=similarity, backend=backend, conv_norm=conv_norm))
        self.config = cfg
        dims, depths = cfg["dims"], cfg["depths"]
        self.num_classes, self.in_chans = cfg["num_classes"], cfg["in_chans"]

        half = dims[0] // 2
        norm = LayerNorm2d if cfg["conv_norm"] == "ln2d" else nn.BatchNorm2d  # after each strided conv
        # VMamba's patch embed v2 with its Identity placeholders at 1, 3, 6 so checkpoint indices line up.
        self.patch_embed = nn.Sequential(
            nn.Conv2d(self.in_chans, half, kernel_size=3, stride=2, padding=1), nn.Identity(), norm(half),
            nn.Identity(), nn.GELU(),
            nn.Conv2d(half, dims[0], kernel_size=3, stride=2, padding=1), nn.Identity(), norm(dims[0]))

        ss2d_kwargs = dict(
            d_state=cfg["d_state"], ssm_ratio=cfg["ssm_ratio"], conv_bias=False,
            coarse_memory_size=cfg["coarse_memory_size"] if cfg["use_coarse_memory"] else 0,
            fine_memory_size=cfg["fine_memory_size"] if cfg["use_fine_memory"] else 0,
            fusion=cfg["use_fusion"], similarity=cfg["similarity"], backend=cfg["backend"])
        n_blocks = sum(depths)  # stochastic depth rising linearly from 0 to drop_path_rate, as VMamba
        drop_rates = [cfg["drop_path_rate"] * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            rates = drop_rates[sum(depths[:i]):sum(depths[:i + 1])]
            blocks = [MemSSMBlock(dim, drop_path=r, mlp_ratio=cfg["mlp_ratio"], **ss2d_kwargs) for r in rates]
            downsample = (nn.Sequential(nn.Identity(), nn.Conv2d(dim, dims[i + 1], kernel_size=3, stride=2, padding=1),
                                        nn.Identity(), norm(dims[i + 1]))
                          if i < len(dims) - 1 else nn.Identity())
            self.layers.append(_Stage(blocks, downsample))
        self.classifier = _Classifier(dims[-1], self.num_classes)
        self.apply(vmamba_init_weights)
        for m in self.modules():  # VMamba's init covers the non-memory layers only
            if isinstance(m, MemoryNetwork):
                m.reset_parameters()

    @property
    def backend(self) -> str | None:
        return self.config["backend"]

    def set_backend(self, backend: str | None) -> None:
        """Route every op of the model to `backend` (None | "torch" | "cpu" | "cuda")."""
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        self.config["backend"] = backend
        for m in self.modules():
            if isinstance(m, SS2D):
                m.backend = backend

    def forward_features(self, x: torch.Tensor, aux: MemoryAux | None = None) -> torch.Tensor:
        """x (B, in_chans, H, W) -> last-stage features (B, dims[-1], H/32, W/32); fills `aux` if given."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must have shape (batch, in_chans={self.in_chans}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        x = self.patch_embed(x)
        for stage in self.layers:
            for block in stage.blocks:
                if aux is None:
                    x = block(x)
                else:
                    x, block_aux = block(x, return_aux=True)
                    aux.blocks.append(block_aux)
            x = stage.downsample(x)
        return x

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """x (B, in_chans, H, W) -> logits (B, num_classes); with return_aux -> (logits, MemoryAux)."""
        aux = MemoryAux() if return_aux else None
        logits = self.classifier(self.forward_features(x, aux))
        return (logits, aux) if return_aux else logits


def list_models() -> list[str]:
    """Names accepted by create_model."""
    return sorted(_CONFIGS)


def model_config(name: str, **overrides) -> dict:
    """The full, validated config create_model would build (dims expanded per stage)."""
    if name not in _CONFIGS:
        raise ValueError(f"name must be one of {list_models()}, got {name!r}")
    unknown = sorted(set(overrides) - set(_CONFIGS[name]))
    if unknown:
        raise TypeError(f"unknown override(s) {unknown} for {name}; allowed: {sorted(_CONFIGS[name])}")
    return _validate({**_CONFIGS[name], **overrides})


def create_model(name: str, **overrides) -> MemoryMamba:
    """Build a named MemoryMamba config (see list_models()).

    Overrides: num_classes, in_chans, dims (int: doubled per stage, or one per stage), depths,
    d_state, ssm_ratio, mlp_ratio, drop_path_rate, use_coarse_memory, use_fine_memory, use_fusion,
    coarse_memory_size, fine_memory_size, similarity ("cosine" | "l1" | "l2"), backend,
    conv_norm (the norm after each strided conv of the patch embed and the downsamples: "ln2d",
    VMamba's, whose checkpoints load | "bn": BatchNorm, for training small models from scratch).
    """
    return MemoryMamba(**model_config(name, **overrides))
