"""How far scan kernels alone can speed up the tiny model's CPU training step (Amdahl's bound).

Times one training step (memorymamba_tiny, batch 8, 224x224, cross-entropy + AdamW) three ways, in
interleaved rounds: with the fast PyTorch scan, with our kernels, and with the SS2D core replaced by
a free pass-through. torch / free is the most any scan kernel can give.

    python -m bench.model_step_bound --threads 2
"""
import argparse
import time

import torch
import torch.nn.functional as F

import memorymamba
from memorymamba.nn import ss2d as ss2d_mod


class _FreeCore:
    """memorymamba.ops with cross_selective_scan replaced by a pass-through of its input."""

    def __getattr__(self, name):
        return getattr(memorymamba.ops, name)

    @staticmethod
    def cross_selective_scan(u, *args, x_shift=None, silu=False, **kwargs):
        if x_shift is not None:
            u = u + x_shift[:, :, None, None]
        return F.silu(u) if silu else u * 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = memorymamba.create_model("memorymamba_tiny", num_classes=1000, drop_path_rate=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    x, y = torch.randn(args.batch, 3, 224, 224), torch.randint(0, 1000, (args.batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    best = {}
    try:
        for _ in range(args.rounds):  # interleaved, so load drifts hit every variant
            for name in ("torch", "kernel", "free"):
                ss2d_mod.ops = _FreeCore() if name == "free" else memorymamba.ops
                model.set_backend("torch" if name == "torch" else None)
                step()  # warm-up
                for _ in range(2):
                    t = time.perf_counter()
                    step()
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    finally:
        ss2d_mod.ops = memorymamba.ops
    print(f"tiny train step, batch {args.batch}, {args.threads} threads: torch scan {best['torch']:.3f} s, "
          f"kernels {best['kernel']:.3f} s, free SS2D core {best['free']:.3f} s")
    print(f"kernels vs torch: {best['torch'] / best['kernel']:.2f}x; bound with a free core: "
          f"{best['torch'] / best['free']:.2f}x")


if __name__ == "__main__":
    main()
