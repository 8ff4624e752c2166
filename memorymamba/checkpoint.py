"""Load VMamba classification checkpoints into MemoryMamba (DESIGN section 4).

Our non-memory parameter names are VMamba's, so loading is matching by name: every tensor whose name
and shape agree is copied; the memory networks (`*.coarse_memory.*`, `*.fine_memory.*`), which VMamba
checkpoints lack, keep their fresh initialisation (a MemoryMamba checkpoint's memory tensors load
when their shapes agree); a head of another class count, or memory of another size, is left fresh
(reported as resized); a patch-embedding conv trained on another number of input channels is
adapted (grayscale: the sum of the RGB filters, the same response to a gray image replicated to RGB).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

import torch
import torch.nn as nn

MEMORY_MARKERS = (".coarse_memory.", ".fine_memory.")
HEAD_PREFIX = "classifier.head."
STEM_KEY = "patch_embed.0.weight"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What load_vmamba_checkpoint did, by parameter/buffer name.

    loaded: copied from the checkpoint. fresh: memory tensors kept at their initialisation (VMamba has
    none). resized: the head (another class count) or memory tensors (another memory size), left
    fresh, as "name: ckpt -> model shape". adapted: loaded after adapting the input-channel count.
    missing: other model tensors the checkpoint lacks. unexpected: checkpoint tensors the model has
    no place for.
    """

    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def names(items, limit=8):
            if not items:
                return "none"
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        total = len(self.loaded) + len(self.fresh) + len(self.resized) + len(self.missing)
        return "\n".join([
            f"loaded {len(self.loaded)} of {total} model tensors from the VMamba checkpoint",
            f"  fresh (memory, {len(self.fresh)}): {names(sorted({_module_of(k) for k in self.fresh}))}",
            f"  resized (kept fresh): {names(self.resized)}",
            f"  adapted: {names(self.adapted)}",
            f"  missing: {names(self.missing)}",
            f"  unexpected: {names(self.unexpected)}",
        ])


def _module_of(key: str) -> str:
    for marker in MEMORY_MARKERS:
        if marker in key:
            return key[:key.index(marker) + len(marker) - 1]
    return key


def _read(path_or_dict, trusted: bool) -> dict:
    if isinstance(path_or_dict, (str, os.PathLike)):
        try:
            obj = torch.load(path_or_dict, map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"checkpoint {os.fspath(path_or_dict)!r} holds Python objects besides tensors (VMamba's "
                f"training checkpoints also pickle their config); pass trusted=True to unpickle it fully, "
                f"only for a file you trust. torch said: {str(e).splitlines()[0]}") from e
    elif isinstance(path_or_dict, dict):
        obj = path_or_dict
    else:
        raise TypeError(f"path_or_dict must be a path or a dict, got {type(path_or_dict).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"checkpoint must be a state dict of tensors (or hold one under 'model'), "
                             f"but {k!r} is a {type(v).__name__}")
        for prefix in _WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state


def _adapt_stem(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Conv weight (O, C_ckpt, k, k) -> (O, in_chans, k, k) with the same response to channel-replicated input."""
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_chans // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


def load_vmamba_checkpoint(model: nn.Module, path_or_dict, *, trusted: bool = False) -> LoadReport:
    """Fill `model` (a MemoryMamba) from a VMamba classification checkpoint; returns a LoadReport.

    path_or_dict: a file path, a checkpoint dict with the state dict under "model" (VMamba's format)
    or "state_dict", or a bare state dict. "module." prefixes (DDP) are dropped. Shapes that differ
    anywhere but the head and the stem's input channels mean another architecture: ValueError.
    trusted: allow full unpickling of a file (needed for VMamba's training checkpoints, which pickle
    their config); default False reads tensors only.
    """
    state = _read(path_or_dict, trusted)
    own = model.state_dict()
    report = LoadReport()
    to_load, mismatched = {}, []
    for key, target in own.items():
        is_memory = any(m in key for m in MEMORY_MARKERS)
        if is_memory and key not in state:
            report.fresh.append(key)
            continue
        if key not in state:
            report.missing.append(key)
            continue
        src = state[key]
        if src.shape == target.shape:
            to_load[key] = src
            report.loaded.append(key)
        elif src.dim() == 4 and src.shape[2:] == (1, 1) and src.shape[:2] == target.shape:
            to_load[key] = src.reshape(target.shape)  # a 1x1-conv checkpoint of a Linear2d
            report.loaded.append(key)
        elif key.startswith(HEAD_PREFIX) or is_memory:
            report.resized.append(f"{key}: {tuple(src.shape)} -> {tuple(target.shape)}")
        elif (key == STEM_KEY and src.dim() == 4 and src.shape[0] == target.shape[0]
              and src.shape[2:] == target.shape[2:]):
            to_load[key] = _adapt_stem(src, target.shape[1])
            report.adapted.append(f"{key}: {tuple(src.shape)} -> {tuple(target.shape)}")
        else:
            mismatched.append(f"{key}: checkpoint {tuple(src.shape)} vs model {tuple(target.shape)}")
    if mismatched:
        raise ValueError(f"the checkpoint is for another architecture; {len(mismatched)} tensor shape(s) differ "
                         f"(check dims, ssm_ratio, d_state): " + "; ".join(mismatched[:5]))
    report.unexpected = sorted(set(state) - set(own))
    model.load_state_dict(to_load, strict=False)
    return report
