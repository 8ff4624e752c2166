"""Whole MemoryMamba models: training and inference images/s and peak memory, compiled kernels vs
the pure-PyTorch model.

train: model.train(), forward + cross-entropy + backward + AdamW step (the paper's optimiser) under
       autocast for bf16; the memory losses are left out so the row measures the network itself.
infer: model.eval() under torch.inference_mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import common
from bench.bench_block import autocast
from bench.harness import Case, Provider


def make_case(name: str, batch: int, img: int, dtype: torch.dtype, device: str,
              modes=("train", "infer"), num_classes: int = 1000) -> Case:
    from memorymamba import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, drop_path_rate=0.0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)

    def make_inputs():
        return (torch.randn(batch, 3, img, img, device=device),
                torch.randint(0, num_classes, (batch,), device=device))

    def run(backend):
        def forward(x):
            if model.backend != backend:  # a walk over every module: keep it out of batch-1 latency
                model.set_backend(backend)
            with autocast(device, dtype):
                return model(x)
        return forward

    def train(forward, inputs):
        x, y = inputs
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()
        return loss.detach()

    def infer(forward, inputs):
        model.eval()
        with torch.inference_mode():
            return forward(inputs[0])

    why, note = common.module_kernel_provider(device)
    providers = [Provider(f"kernel-{device}", run(None), why, note=note),
                 Provider("torch", run("torch"), baseline=True)]
    return Case(op="model", shape=dict(model=name.replace("memorymamba_", ""), batch=batch, img=img),
                dtype=dtype, providers=providers, make_inputs=make_inputs, modes=modes, items=batch,
                custom_modes={"train": train, "infer": infer})


def case(g: dict, device: str) -> Case:
    """The case of one bench.suites grid entry."""
    return make_case("memorymamba_" + g["model"], g["batch"], g["img"], g["dtype"], device, g["modes"])
