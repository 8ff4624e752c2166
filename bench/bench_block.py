"""The Mem-SSM block and its mixers (memorymamba.nn): the compiled backend vs pure PyTorch.

Ops (each a module from memorymamba.nn, built as the model builds them: d_state 1, ssm_ratio 1):
  mem_ssm_block  MemSSMBlock (norm, MemSS2D, MLP, residuals): what a model stage repeats
  memss2d        MemSS2D alone (coarse 4 + fine 8 memory cells, cosine fusion)
  ss2d           SS2D without memory (the memory's cost is memss2d / ss2d)
Providers are the backends the module routes its ops to (kernel-<device>: every op with a compiled
kernel runs it, the row's note lists them; torch: pure PyTorch); add a fused-block provider by adding an
entry to `module_providers` (e.g. once issue 6's fused MemSS2D exists, a module class per provider).
Inputs are x (B, C, H, W) plus the module's parameters, so backward times every gradient.
"""
from __future__ import annotations

import contextlib

import torch

from bench import common
from bench.harness import Case, Provider

OPS = ("mem_ssm_block", "memss2d", "ss2d")
_KW = dict(d_state=1, ssm_ratio=1.0, conv_bias=False)


def build_module(op: str, dim: int) -> torch.nn.Module:
    from memorymamba import nn as mnn

    if op == "mem_ssm_block":
        return mnn.MemSSMBlock(dim, drop_path=0.0, coarse_memory_size=4, fine_memory_size=8, **_KW)
    if op == "memss2d":
        return mnn.MemSS2D(d_model=dim, channel_first=True, **_KW)
    if op == "ss2d":
        return mnn.SS2D(d_model=dim, channel_first=True, **_KW)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def set_backend(module: torch.nn.Module, backend: str) -> None:
    from memorymamba.nn import SS2D

    for m in module.modules():
        if isinstance(m, SS2D):
            m.backend = backend


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision as a training script runs it: fp32 parameters, bf16/fp16 activations."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def module_providers(module: torch.nn.Module, device: str, dtype: torch.dtype) -> list[Provider]:
    """The compiled backend (backend=None on `device` tensors, see common.module_kernel_provider)
    and pure PyTorch."""
    def run(backend):
        def fwd(x, *params):
            set_backend(module, backend)
            with autocast(device, dtype):
                return module(x)
        return fwd

    why, note = common.module_kernel_provider(device)
    return [Provider(f"kernel-{device}", run(None), why, note=note),
            Provider("torch", run("torch"), baseline=True)]


def make_case(op: str, batch: int, dim: int, side: int, dtype: torch.dtype, device: str,
              modes=("fwd", "bwd", "fwd+bwd")) -> Case:
    torch.manual_seed(0)
    module = build_module(op, dim).to(device)
    params = tuple(p for p in module.parameters() if p.requires_grad)

    def make_inputs():
        return (torch.randn(batch, dim, side, side, device=device, requires_grad=True), *params)

    return Case(op=op, shape=dict(batch=batch, dim=dim, H=side, W=side, N=1), dtype=dtype,
                providers=module_providers(module, device, dtype), make_inputs=make_inputs, modes=modes)


def case(g: dict, device: str) -> Case:
    """The case of one bench.suites grid entry."""
    return make_case(g["op"], g["batch"], g["dim"], g["side"], g["dtype"], device, g["modes"])
