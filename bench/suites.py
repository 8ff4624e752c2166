"""Which shapes each suite measures, per op. One place, so the README can say what a suite is.

quick      seconds: tiny odd shapes, every provider incl. the loop reference (tests, dry runs)
cpu        the default on CPU, < 5 minutes on 2 cores: the issue-3/issue-6 CPU criteria rows
           (VMamba-T stage 1, 56x56, D = 96, N = 1, batch 8) plus a few stage shapes and the models
gpu-check  the rows bench/gpu_check.sh records: the issue-3 "done when" rows (VMamba-T stage 1,
           batch 128, bf16) and the issue-6 block/latency rows; a couple of minutes on an H100
gpu        the default on CUDA: stage shapes 56/28/14/7 at tiny and base widths, batch 8 and 128,
           fp32/bf16/fp16, N = 1 and 16; models tiny/small/base at 224, batch 64 and 128
full       gpu plus batch 1 and 32 and every dtype for the scans (long)
"""
from __future__ import annotations

import itertools

import torch

from bench.common import stage_shape

SUITES = ("quick", "cpu", "gpu-check", "gpu", "full")
ALL = ("fwd", "bwd", "fwd+bwd")
FB = ("fwd", "fwd+bwd")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _scan(config, stage, batch, N, dtype, modes):
    dim, side = stage_shape(config, stage)
    return dict(batch=batch, dim=dim, side=side, N=N, dtype=dtype, modes=modes)


def _sweep(configs, stages, batches, Ns, dtypes, modes):
    return [_scan(c, s, b, n, d, modes) for c, s, b, n, d in itertools.product(configs, stages, batches, Ns, dtypes)]


def _grids() -> dict[str, dict[str, list[dict]]]:
    quick_scan = dict(batch=2, dim=16, side=9, N=1, dtype=F32, modes=ALL)
    gpu_scan = (_sweep(("tiny", "base"), (1, 2, 3, 4), (8, 128), (1,), (F32, BF16, F16), ALL)
                + _sweep(("tiny",), (1, 2, 3, 4), (32,), (16,), (BF16,), ALL))
    full_scan = gpu_scan + _sweep(("tiny", "small", "base"), (1, 2, 3, 4), (1, 32), (1, 16), (F32, BF16, F16), ALL)
    return {
        "selective_scan": {
            "quick": [dict(quick_scan, dim=8)],
            "cpu": [_scan("tiny", 1, 8, 1, F32, FB), _scan("tiny", 3, 2, 16, F32, ("fwd",))],
            "gpu-check": [_scan("tiny", 1, 128, 1, BF16, FB), _scan("tiny", 3, 128, 16, BF16, ("fwd",))],
            "gpu": gpu_scan,
            "full": full_scan,
        },
        # act=True: the block's memory add + SiLU fused into the op vs done in PyTorch first (issue 6)
        "cross_selective_scan": {
            "quick": [quick_scan, dict(quick_scan, act=True)],
            "cpu": [_scan("tiny", 1, 8, 1, F32, ALL), _scan("tiny", 3, 8, 1, F32, FB),
                    _scan("tiny", 4, 8, 1, F32, FB), dict(quick_scan, batch=1),
                    dict(_scan("tiny", 1, 8, 1, F32, FB), act=True), dict(_scan("tiny", 4, 8, 1, F32, FB), act=True)],
            "gpu-check": [_scan("tiny", 1, 128, 1, BF16, ALL), _scan("tiny", 1, 128, 1, F32, FB),
                          _scan("tiny", 3, 128, 1, BF16, FB), _scan("tiny", 1, 1, 1, BF16, ("fwd",)),
                          dict(_scan("tiny", 1, 128, 1, BF16, ALL), act=True)],
            "gpu": gpu_scan,
            "full": full_scan,
        },
        "memory_attention": {
            "quick": [dict(batch=8, dim=96, cells=4, similarity="cosine", dtype=F32, modes=ALL)],
            "cpu": [dict(batch=8, dim=d, cells=c, similarity="cosine", dtype=F32, modes=ALL)
                    for d, c in ((96, 4), (768, 8))]
            # with side: the block's fused memory path (pooling + coarse `cells` + fine 2*`cells` networks)
            + [dict(batch=b, dim=96, side=56, cells=4, similarity="cosine", dtype=F32, modes=ALL) for b in (1, 8)],
            "gpu-check": [dict(batch=b, dim=96, cells=8, similarity="cosine", dtype=BF16, modes=ALL) for b in (1, 128)]
            + [dict(batch=b, dim=96, side=56, cells=4, similarity="cosine", dtype=BF16, modes=ALL) for b in (1, 128)],
            "gpu": [dict(batch=b, dim=stage_shape("tiny", s)[0], cells=c, similarity=sim, dtype=BF16, modes=ALL)
                    for b, s, c, sim in itertools.product((1, 128), (1, 4), (4, 8), ("cosine", "l2"))],
            "full": [dict(batch=b, dim=stage_shape(cfg, s)[0], cells=c, similarity=sim, dtype=dt, modes=ALL)
                     for b, cfg, s, c, sim, dt in itertools.product(
                         (1, 32, 128), ("tiny", "base"), (1, 2, 3, 4), (2, 4, 8, 16), ("cosine", "l1", "l2"),
                         (F32, BF16))],
        },
        "block": {
            "quick": [dict(op="mem_ssm_block", batch=2, dim=32, side=14, dtype=F32, modes=FB)],
            "cpu": [dict(op=op, batch=8, dim=96, side=56, dtype=F32, modes=FB if op == "memss2d" else ("fwd",))
                    for op in ("mem_ssm_block", "memss2d", "ss2d")],
            "gpu-check": [dict(op=op, batch=128, dim=96, side=56, dtype=BF16, modes=FB)
                          for op in ("mem_ssm_block", "memss2d", "ss2d")],
            "gpu": [dict(op=op, batch=128, dim=stage_shape("tiny", s)[0], side=stage_shape("tiny", s)[1], dtype=BF16,
                         modes=ALL) for op, s in itertools.product(("mem_ssm_block", "memss2d", "ss2d"), (1, 2, 3, 4))],
            "full": [dict(op=op, batch=b, dim=stage_shape(cfg, s)[0], side=stage_shape(cfg, s)[1], dtype=dt, modes=ALL)
                     for op, b, cfg, s, dt in itertools.product(("mem_ssm_block", "memss2d", "ss2d"), (1, 32, 128),
                                                                ("tiny", "base"), (1, 2, 3, 4), (F32, BF16))],
        },
        "model": {
            "quick": [dict(model="nano", batch=2, img=64, dtype=F32, modes=("train", "infer"))],
            "cpu": [dict(model="nano", batch=8, img=64, dtype=F32, modes=("train", "infer")),
                    dict(model="tiny", batch=8, img=224, dtype=F32, modes=("train",))],
            "gpu-check": [dict(model="tiny", batch=128, img=224, dtype=BF16, modes=("train", "infer")),
                          dict(model="tiny", batch=1, img=224, dtype=BF16, modes=("infer",))],
            "gpu": [dict(model=m, batch=b, img=224, dtype=BF16, modes=("train", "infer"))
                    for m, b in itertools.product(("tiny", "small", "base"), (64, 128))],
            "full": [dict(model=m, batch=b, img=224, dtype=dt, modes=("train", "infer"))
                     for m, b, dt in itertools.product(("tiny", "small", "base"), (1, 64, 128), (F32, BF16))],
        },
    }


def grid(op: str, suite: str) -> list[dict]:
    """The parameter dicts `op`'s bench runs for `suite`."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    seen, out = set(), []
    for g in _grids()[op][suite]:  # tiny and small share widths: keep each shape once
        key = tuple(sorted((k, str(v)) for k, v in g.items()))
        if key not in seen:
            seen.add(key)
            out.append(g)
    return out
