"""Where a MemoryMamba training step spends its time: torch.profiler over a few steps, the top ops.

The step is the bench's `model` train row (bench.bench_model: forward under autocast, cross-entropy,
backward, AdamW) with the compiled kernels; the table is sorted by device time on a GPU and by CPU
time on a CPU. bench/gpu_check.sh runs it after the benchmark rows, so a GPU session shows which
kernels dominate the model step.

    python -m bench.profile_model                       # CPU: memorymamba_nano, batch 32, 64x64, fp32
    python -m bench.profile_model --device cuda         # GPU: memorymamba_tiny, batch 128, 224x224, bf16
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_model import make_case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", help="default: memorymamba_tiny on cuda, memorymamba_nano on cpu")
    ap.add_argument("--batch", type=int, help="default: 128 on cuda, 32 on cpu")
    ap.add_argument("--img", type=int, help="default: 224 on cuda, 64 on cpu")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps, after 2 warm-up steps")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    name = args.model or ("memorymamba_tiny" if cuda else "memorymamba_nano")
    batch = args.batch or (128 if cuda else 32)
    img = args.img or (224 if cuda else 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    case = make_case(name, batch, img, dtype, args.device, modes=("train",), num_classes=1000 if cuda else 6)
    kernels = case.providers[0]
    if kernels.why_not:
        ap.error(f"no compiled kernels to profile: {kernels.why_not}")
    train, inputs = case.custom_modes["train"], case.make_inputs()

    def step():
        train(kernels.fn, inputs)

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    print(f"{name}, batch {batch}, {img}x{img}, {dtype}, {args.device}: {args.steps} training steps")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
