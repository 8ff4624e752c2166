"""Training: one process on CPU/GPU, or many under torchrun (DistributedDataParallel).

A run folder (<output>/<name>/) holds config.yaml (resolved), metrics.jsonl (one line per epoch),
last.pt and best.pt (atomic: written to a temp file then os.replace'd), report.json and PNGs.

Determinism: the shuffling, augmentation and dropout of epoch e are drawn from generators seeded
with (seed, e), and checkpoints hold model, optimizer, scheduler, scaler, RNG states and history,
so on CPU `--resume` continues bit-for-bit: 2 epochs straight == 1 epoch + resume for 1.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import config as config_mod
from .config import ConfigError, TrainConfig
from .data import NORM, DataError, augment, normalize, prepare
from .data.synthetic import usable_cores
from .evaluate import evaluate_tensors, write_report
from .metrics import format_report

CHECKPOINT_VERSION = 1
BASELINES = ("resnet18", "resnet50")


class RunError(RuntimeError):
    """A run cannot start or resume as asked (finished run, mismatched checkpoint ...)."""


# --------------------------------------------------------------------------- distributed helpers

class Dist:
    """rank / world size / device of this process; world 1 without torchrun."""

    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise RunError("--device cuda asked for, but torch sees no CUDA device")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.started_here = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.started_here = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.started_here:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, num_classes: int, in_chans: int):
    """(model, note) for cfg.model; note says what --pretrained loaded (or None)."""
    if cfg.model in BASELINES:
        import torchvision
        model = getattr(torchvision.models, cfg.model)(weights=None, num_classes=num_classes)
        if in_chans != 3:
            model.conv1 = torch.nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        note = _load_torchvision_weights(model, cfg.pretrained, in_chans) if cfg.pretrained else None
        return model, note
    import memorymamba
    if cfg.model not in memorymamba.list_models():
        raise ConfigError(f"--model must be one of {memorymamba.list_models() + list(BASELINES)}, got {cfg.model!r}")
    try:
        model = memorymamba.create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, **cfg.model_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model_args for {cfg.model}: {e}") from None
    note = None
    if cfg.pretrained:
        if not os.path.isfile(cfg.pretrained):
            raise ConfigError(f"--pretrained file {cfg.pretrained} does not exist")
        note = str(memorymamba.load_vmamba_checkpoint(model, cfg.pretrained))
    return model, note


def _load_torchvision_weights(model, path, in_chans):
    if not os.path.isfile(path):
        raise ConfigError(f"--pretrained file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    w = state.get("conv1.weight")
    if w is not None and w.shape[1] != in_chans:  # RGB stem -> grayscale: sum keeps the response to gray input
        state["conv1.weight"] = w.sum(1, keepdim=True) if in_chans == 1 else w
    dropped = [k for k in state if k not in own or state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state or k in dropped]
    model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    return f"loaded {len(own) - len(missing)}/{len(own)} tensors from {path}; fresh: {missing}"


def forward_loss(model, criterion, x, y, is_memorymamba):
    """(loss, logits, parts) for one batch."""
    if is_memorymamba:
        logits, aux = model(x, return_aux=True)
        loss, parts = criterion(logits, y, aux)
        return loss, logits, parts
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y, weight=criterion.class_weight, label_smoothing=criterion.label_smoothing)
    return loss, logits, {"cls": loss.detach()}


# --------------------------------------------------------------------------- checkpoints

def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: never a torn file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """A run checkpoint (from this package); RunError naming the file if it is not one."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RunError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "memorymamba-run":
        raise RunError(f"{path} is not a memorymamba training checkpoint (use --pretrained for VMamba weights)")
    ckpt["path"] = path
    return ckpt


def _rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2 ** 63)


# --------------------------------------------------------------------------- schedule / sampling

def lr_lambda(total_steps: int, warmup_fraction: float):
    """Linear warm-up over warmup_fraction of the steps, then linear decay to 0 (paper sec. 5.2)."""
    warm = int(round(total_steps * warmup_fraction))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return f


def epoch_indices(n, epoch, cfg, weights, dist_):
    """This rank's sample order for `epoch`: a seeded permutation (or weighted draw with
    replacement for balance=sampler), padded to a multiple of the world size and strided by rank --
    DistributedSampler's scheme, with the weighted case added."""
    g = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 1))
    if weights is not None:
        order = torch.multinomial(weights, n, replacement=True, generator=g)
    else:
        order = torch.randperm(n, generator=g)
    per_rank = math.ceil(n / dist_.world)
    if per_rank * dist_.world > n:
        order = torch.cat([order, order[: per_rank * dist_.world - n]])
    return order[dist_.rank::dist_.world]


# --------------------------------------------------------------------------- main entry

def _amp_dtype(cfg, device):
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _run_dir(cfg: TrainConfig) -> str:
    name = cfg.name or "{}-{}-{}".format(
        cfg.model, "synthetic" if cfg.data == "synthetic" else os.path.basename(os.path.normpath(cfg.data)),
        time.strftime("%Y%m%d-%H%M%S"))
    return os.path.join(cfg.output, name)


def _log(d: Dist, msg: str):
    if d.main:
        print(msg, flush=True)


def busy_cores(window_s: float = 0.3) -> float:
    """Cores other processes keep busy now: /proc/stat sampled over `window_s` on Linux (the load
    average lags by a minute), the 1-min load average elsewhere."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
        return usable_cores() * (1 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def auto_threads() -> tuple[int, float]:
    """(threads, busy cores): torch's default thread count less the cores other processes keep busy.

    OpenMP threads spin while they wait for each other: on the 2-core dev box, 2 threads beside
    busy processes made a nano epoch 10-20x slower than 1 thread did, while on an idle box 2
    threads are ~1.5x faster than 1. torchrun's ranks on one machine split the idle cores.
    """
    busy = busy_cores()
    idle = round(usable_cores() - busy)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(torch.get_num_threads(), idle // max(local_ranks, 1))), busy


def train(cfg: TrainConfig | None = None, resume: str | None = None) -> dict:
    """Train per `cfg` (or continue the run `resume`: a run folder or last.pt); returns the report
    dict (also written to report.json). Raises ConfigError / DataError / RunError on bad input."""
    ckpt = None
    if resume:
        ckpt = load_checkpoint(resume)
        cfg = TrainConfig(**ckpt["config"])
        if ckpt["epoch"] >= cfg.epochs:
            raise RunError(f"run {os.path.dirname(ckpt['path'])} already finished ({ckpt['epoch']}/{cfg.epochs} "
                           f"epochs); nothing to resume -- start a new run instead")
    cfg = cfg or config_mod.resolve()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:
        threads, busy = auto_threads()
        torch.set_num_threads(threads)
        print(f"torch CPU threads: {threads} ({busy:.1f} of {usable_cores()} cores busy; --threads N to choose)",
              flush=True)
        # Recorded in the run's config, so --resume uses the same count: CPU reductions may sum in a
        # thread-dependent order, and a resumed run must continue bit for bit.
        cfg = dataclasses.replace(cfg, threads=threads)
    d = Dist(cfg.device)
    try:
        return _train(cfg, ckpt, d)
    finally:
        d.close()


def _train(cfg, ckpt, d):
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    run_dir = os.path.dirname(ckpt["path"]) if ckpt else _run_dir(cfg)
    if ckpt is None and d.main and os.path.exists(os.path.join(run_dir, "last.pt")):
        raise RunError(f"run folder {run_dir} already holds a run; pick another --name or --resume it")
    d.barrier()

    if d.world > 1 and cfg.data == "synthetic":  # rank 0 generates the cached dataset, the others wait
        from .data import ensure_synthetic, synthetic_spec
        if d.main:
            ensure_synthetic(synthetic_spec(cfg))
        d.barrier()
    data = prepare(cfg)
    classes = data.classes
    if ckpt and ckpt["classes"] != classes:
        raise RunError(f"checkpoint {ckpt['path']} was trained on classes {ckpt['classes']}, the data now has {classes}")
    counts = torch.bincount(data.labels["train"], minlength=len(classes))
    ratio = float(counts.max() / counts.clamp(min=1).min())
    balance = cfg.balance if cfg.balance != "auto" else ("weight" if ratio > 1.5 else "none")
    class_weight = (counts.sum() / (len(classes) * counts.clamp(min=1).float())) if balance == "weight" else None
    sample_weights = (1.0 / counts.clamp(min=1).float())[data.labels["train"]] if balance == "sampler" else None

    model, pretrained_note = build_model(cfg, len(classes), cfg.channels)
    is_mm = cfg.model not in BASELINES
    model.to(d.device)
    import memorymamba
    criterion = memorymamba.MemoryMambaLoss(lambda_c=cfg.lambda_c, lambda_f=cfg.lambda_f, temperature=cfg.temperature,
                                            class_weight=class_weight, label_smoothing=cfg.label_smoothing).to(d.device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "memory" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "memory" not in n.lower())]
    # fused: one kernel over all parameters. Torch's default CPU AdamW loops over the ~200 tensors of
    # memorymamba_nano with ~10 ops each: 8.3-8.9 ms a step against 1.9-2.0 ms fused on 2 cores, ~8% of
    # a training step at batch 32.
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    n_train = len(data.labels["train"])
    steps_per_epoch = math.ceil(math.ceil(n_train / d.world) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps_per_epoch * cfg.epochs, cfg.warmup_fraction))
    amp_dtype = _amp_dtype(cfg, d.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start_epoch, best, history = 0, -1.0, []
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise RunError(f"checkpoint {ckpt['path']} does not fit the model: {str(e).splitlines()[0]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, best, history = ckpt["epoch"], ckpt["best_metric"], ckpt["history"]
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=is_mm)  # ablations leave memory parameters out of the graph

    mean, std = NORM[cfg.channels]
    if d.main:
        os.makedirs(run_dir, exist_ok=True)
        config_mod.dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))
    n_params = sum(p.numel() for p in model.parameters())
    _log(d, f"run {run_dir}: {cfg.model} ({n_params / 1e6:.2f}M params) on {data.root} [{data.format}], "
            f"{len(classes)} classes, train/val/test = {n_train}/{len(data.labels['val'])}/{len(data.labels['test'])}, "
            f"recipe {cfg.recipe}, device {d.device}{f' x{d.world}' if d.world > 1 else ''}, balance {balance}"
            f"{'' if not ckpt else f', resuming after epoch {start_epoch}'}")
    if pretrained_note:
        _log(d, pretrained_note)

    from tqdm import tqdm
    images, labels = data.images["train"], data.labels["train"]
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        net.train()
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, 0))  # dropout / drop-path of this epoch
        aug_gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 2))
        order = epoch_indices(n_train, epoch, cfg, sample_weights, d)
        sums = torch.zeros(5, dtype=torch.float64)  # loss*n, correct, n, contrastive*n, nce*n
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and d.main), file=sys.stderr, dynamic_ncols=True)
        for i in bar:
            idx = order[i:i + cfg.batch_size]
            xb = images[idx]
            if cfg.augment:
                xb = augment(xb, aug_gen)
            x = normalize(xb.to(d.device, non_blocking=True), mean, std)
            y = labels[idx].to(d.device, non_blocking=True)
            ctx = torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            with ctx:
                loss, logits, parts = forward_loss(net, criterion, x, y, is_mm)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if not torch.isfinite(loss):
                raise RunError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr or check the data")
            b = len(idx)
            sums += torch.tensor([loss.item() * b, (logits.argmax(1) == y).sum().item(), b,
                                  float(parts.get("contrastive", 0.0)) * b, float(parts.get("nce", 0.0)) * b],
                                 dtype=torch.float64)
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}")
        bar.close()
        sums = d.all_sum(sums)
        val = evaluate_tensors(net, data.images["val"], data.labels["val"], classes, cfg, d, mean, std)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": float(sums[0] / sums[2]),
               "train_acc": float(sums[1] / sums[2]), "train_contrastive": float(sums[3] / sums[2]),
               "train_nce": float(sums[4] / sums[2]), "val_loss": val["loss"], "val_acc": val["accuracy"],
               "val_macro_f1": val["macro_f1"], "epoch_time_s": time.time() - t0}
        history.append(row)
        improved = val["accuracy"] > best
        if improved:
            best = val["accuracy"]
        if d.main:
            state = {"format": "memorymamba-run", "version": CHECKPOINT_VERSION, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": _rng_state(), "epoch": epoch + 1,
                     "config": config_mod.to_dict(cfg), "classes": classes, "best_metric": best,
                     "history": history, "norm": (mean, std)}
            atomic_save(state, os.path.join(run_dir, "last.pt"))
            if improved:
                atomic_save(state, os.path.join(run_dir, "best.pt"))
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        d.barrier()
        _log(d, f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}{' *' if improved else ''}  "
                f"lr {row['lr']:.2e}  {row['epoch_time_s']:.1f}s")

    # Test with the best-on-validation weights.
    model.load_state_dict(load_checkpoint(os.path.join(run_dir, "best.pt"))["model"])
    test = evaluate_tensors(net, data.images["test"], data.labels["test"], classes, cfg, d, mean, std)
    val = evaluate_tensors(net, data.images["val"], data.labels["val"], classes, cfg, d, mean, std)
    report = {"run_dir": run_dir, "model": cfg.model, "params": n_params, "data": data.root, "format": data.format,
              "classes": classes, "device": str(d.device), "world_size": d.world,
              "train_counts": counts.tolist(), "balance": balance, "best_val_acc": best,
              "wall_time_s": time.time() - t_start, "val": val, "test": test, "history": history}
    if d.main:
        write_report(report, run_dir, history)
        _log(d, "test (best-on-val weights):\n" + format_report(test))
        _log(d, f"test accuracy {test['accuracy']:.4f}  macro F1 {test['macro_f1']:.4f}  "
                f"wall {report['wall_time_s']:.1f}s  -> {run_dir}")
    d.barrier()
    return report
