"""The one benchmark harness: timing, peak memory, copy bandwidth, byte/FLOP models, rows, tables.

Every bench_<op>.py builds `Case`s (one shape x dtype, several providers, several modes) and hands
them to `run_case`, which times every provider in every mode in the same process, so the ratios
between providers and the % of copy bandwidth come from one run on one machine.

GPU timing: CUDA events around each call, L2 flushed before each call (a write of 4x the L2 size),
input sets rotated so that they span more than 3x the L2 size, median and 20/80 quantiles.
CPU timing: wall clock per call after warm-up, same statistics, input sets rotated over the LLC.
Peak memory: GPU, `max_memory_allocated` after `reset_peak_memory_stats` minus what was allocated
before the call (the inputs are not counted), plus NVML's device-used memory when pynvml imports;
CPU, growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS
before the call.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import time
from typing import Any, Callable, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------------------------
# Machine description: on every row.

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The GPU's name, or '<n>-core <cpu model>' (threads torch uses) for the CPU."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{torch.get_num_threads()}-core {cpu_name()}"


def default_results_path(device: str) -> str:
    """bench/results/<gpu name>.jsonl or bench/results/cpu-<threads>-core-<cpu model>.jsonl."""
    name = _slug(device_name(device))
    return os.path.join(RESULTS_DIR, ("cpu-" + name if device == "cpu" else name) + ".jsonl")


def git_sha() -> str:
    """HEAD's sha (+'-dirty' when tracked files differ); MEMORYMAMBA_GIT_SHA wins (copies without .git)."""
    env = os.environ.get("MEMORYMAMBA_GIT_SHA")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        # other work on the machine skews CPU rows: the 1-minute load average when the run began
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------
# Timing.

@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _stats(times_ms: list[float]) -> Timing:
    xs = sorted(times_ms)
    return Timing(_quantile(xs, 0.5), _quantile(xs, 0.2), _quantile(xs, 0.8), len(xs))


def cache_bytes(device: str) -> int:
    """L2 size on a GPU; the last-level cache on a CPU (8 MiB if unknown)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size",
                           50 << 20))
    best = 8 << 20
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best


@dataclasses.dataclass
class TimingConfig:
    warmup_ms: float = 25.0      # at least this long (and 2 calls) before timing
    min_time_ms: float = 100.0   # keep timing until this much time and min_reps calls
    min_reps: int = 5
    max_reps: int = 200
    max_time_ms: float = 2000.0  # stop after this much timed work even below min_reps (slow baselines)


class Timer:
    """Times a callable on one device; `fn(i)` gets the call index so callers can rotate inputs."""

    def __init__(self, device: str, config: TimingConfig):
        self.device = device
        self.cfg = config
        self._flush = None
        if device == "cuda":
            self._flush = torch.empty(4 * cache_bytes("cuda"), dtype=torch.int8, device="cuda")

    def _one(self, fn: Callable[[int], Any], i: int) -> Any:
        """One call: its CPU wall time in ms, or its (start, end) CUDA events, read later."""
        if self.device == "cuda":
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            return start, end
        t0 = time.perf_counter()
        fn(i)
        return (time.perf_counter() - t0) * 1e3

    def _collect(self, marks: list) -> list[float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in marks]
        return marks

    def time(self, fn: Callable[[int], Any]) -> Timing:
        cfg = self.cfg
        cuda = self.device == "cuda"
        # Warm-up (lazy init, caches, allocator): two calls at least, since the first is often far
        # slower; on the CPU one is enough when it alone took the whole time cap (slow baselines).
        t_start = time.perf_counter()
        n = 0
        while True:
            t0 = time.perf_counter()
            fn(n)
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            n += 1
            elapsed = (t1 - t_start) * 1e3
            if ((n >= 2 or not cuda) and elapsed >= cfg.max_time_ms) or (n >= 2 and elapsed >= cfg.warmup_ms):
                break
        if cuda:
            # Events are read after one sync at the end, so the count is fixed from the last warm-up call.
            est_ms = max((t1 - t0) * 1e3, 1e-3)
            reps = int(min(cfg.max_reps, max(cfg.min_reps, math.ceil(cfg.min_time_ms / est_ms))))
            reps = max(1, min(reps, int(cfg.max_time_ms / est_ms)))
            return _stats(self._collect([self._one(fn, i) for i in range(reps)]))
        times: list[float] = []
        while True:  # the CPU clock is read per call: stop on enough calls and time, or on the cap
            times.append(self._one(fn, len(times)))
            total = sum(times)
            if (len(times) >= cfg.max_reps or total >= cfg.max_time_ms
                    or (len(times) >= cfg.min_reps and total >= cfg.min_time_ms)):
                return _stats(times)


# ----------------------------------------------------------------------------------------------
# Memory.

def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure then undercounts reused heap
        pass


def _nvml_used_mb() -> float | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        idx = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            try:
                idx = int(visible.split(",")[idx])
            except ValueError:
                pass
        handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    except Exception:  # NVML absent in a container: the allocator figure still stands
        return None


def peak_memory(device: str, fn: Callable[[], Any]) -> dict[str, float | None]:
    """Extra memory one call of fn needs above what is allocated before it (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        nvml = _nvml_used_mb()
        del out
        return {"peak_mem_mb": peak / 2**20, "nvml_used_mb": nvml}
    _malloc_trim()  # hand freed heap pages back, so the call's allocations show up as RSS growth
    if not _reset_peak_rss():
        return {"peak_mem_mb": None, "nvml_used_mb": None}
    before = _proc_status_kb("VmRSS")
    out = fn()
    peak = _proc_status_kb("VmHWM") - before
    del out
    return {"peak_mem_mb": max(peak, 0) / 1024, "nvml_used_mb": None}


def copy_bandwidth(device: str, nbytes: int | None = None, cfg: TimingConfig | None = None) -> float:
    """Measured copy bandwidth in GB/s (read + write counted): a device-to-device copy on a GPU,
    a large tensor copy (memcpy, all torch threads) on the CPU."""
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = Timer(device, cfg or TimingConfig(warmup_ms=50, min_time_ms=200, min_reps=10)).time(
        lambda i: dst.copy_(src))
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# Byte and FLOP models (DESIGN section 5). Elements per (batch, position); times the element size.

def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def selective_scan_bytes(batch: int, dim: int, L: int, N: int, groups: int, dtype: torch.dtype,
                         mode: str, has_z: bool = False) -> int:
    """Inputs read and outputs written by a plain selective scan (A, D and bias are negligible).
    fwd: read u, delta, B, C (, z), write y. bwd: read u, delta, B, C, dy (, z), write du, ddelta,
    dB, dC (, dz); the backward recomputes the states instead of reading them."""
    z = dim if has_z else 0
    fwd = (2 * dim + 2 * groups * N + z + dim) * L
    bwd = ((3 * dim + 2 * groups * N + z) + (2 * dim + 2 * groups * N + z)) * L
    per = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    return per * batch * esize(dtype)


def cross_selective_scan_bytes(batch: int, dim: int, L: int, N: int, R: int, dtype: torch.dtype,
                               mode: str) -> int:
    """The fused op's floor: x read once, merged y written once, the per-direction rank-R dt input
    and B, C read (delta is made in-kernel): 2D + 4(R + 2N) elements per position forward.
    Backward: read x, dy and the 4(R + 2N) projections, write dx and their gradients:
    3D + 8(R + 2N)."""
    fwd = 2 * dim + 4 * (R + 2 * N)
    bwd = 3 * dim + 8 * (R + 2 * N)
    per = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    return per * batch * L * esize(dtype)


def unfused_pipeline_bytes(batch: int, dim: int, L: int, N: int, dtype: torch.dtype) -> int:
    """DESIGN's estimate of what VMamba's unfused forward moves: ~22D + 8N elements per position."""
    return (22 * dim + 8 * N) * batch * L * esize(dtype)


def scan_flops(batch: int, channels: int, L: int, N: int, mode: str) -> int:
    """Scan arithmetic per (batch, channel, position, state): forward delta*A, exp, delta*B*u (2),
    state FMA (2), C*x accumulate (2) = 8 (exp counted as 1); backward about twice the forward."""
    fwd = 8 * batch * channels * L * N
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def scan_sfu_ops(batch: int, channels: int, L: int, N: int, mode: str, softplus: bool = True) -> int:
    """Special-function evaluations (exp, log1p): per (channel, position) exp(delta*A) for each of the
    N states plus softplus's exp and log1p; backward recomputes those and adds softplus' sigmoid.
    With N = 1 these units, not memory, may set the floor (DESIGN section 5)."""
    fwd = batch * channels * L * (N + (2 if softplus else 0))
    bwd = fwd + (batch * channels * L if softplus else 0)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ----------------------------------------------------------------------------------------------
# Cases and rows.

@dataclasses.dataclass
class Provider:
    """One implementation of an op. `fn(*inputs)` returns the output (a tensor or tuple);
    `why_not` set means it cannot run here (printed, no row)."""
    name: str
    fn: Callable[..., Any] | None
    why_not: str | None = None
    baseline: bool = False
    note: str | None = None  # stored on its rows (e.g. which ops ran compiled)


@dataclasses.dataclass
class Case:
    """One op at one shape and dtype. `make_inputs()` returns fresh random inputs (a tuple; tensors
    that need gradients already have requires_grad). `bytes_fn(mode)` / `flops_fn(mode)` are the
    minimum-bytes and FLOP models, `sfu_fn(mode)` the special-function count (None where they
    do not apply). `per_item` turns a time into a
    throughput (images/s) for model rows."""
    op: str
    shape: dict[str, Any]
    dtype: torch.dtype
    providers: list[Provider]
    make_inputs: Callable[[], tuple]
    modes: Sequence[str] = MODES
    bytes_fn: Callable[[str], int] | None = None
    flops_fn: Callable[[str], int] | None = None
    sfu_fn: Callable[[str], int] | None = None
    extra: dict[str, Any] | None = None  # stored on every row of the case
    items: int | None = None
    item_unit: str = "img/s"
    # Called as step(provider_fn, inputs) for modes the default fwd/bwd logic does not cover
    # (the model's "train" and "infer").
    custom_modes: dict[str, Callable[[Callable, tuple], Any]] | None = None


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _grad_inputs(inputs: tuple) -> list[torch.Tensor]:
    return [t for t in _tensors(inputs) if t.requires_grad]


def _nbytes(inputs: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(inputs))


def _make_step(mode: str, fn: Callable, inputs: tuple, case: Case):
    """A zero-argument callable that does one `mode` call, built so that bwd times only backward."""
    if case.custom_modes and mode in case.custom_modes:
        step = case.custom_modes[mode]
        return lambda: step(fn, inputs)
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(*inputs)
        return fwd
    grads_of = _grad_inputs(inputs)
    if mode == "fwd+bwd":
        def fwd_bwd():
            outs = [o for o in _tensors(fn(*inputs)) if o.requires_grad]
            gouts = [torch.ones_like(o) for o in outs]  # a fill: cheap next to any op here
            return torch.autograd.grad(outs, grads_of, gouts, allow_unused=True)
        return fwd_bwd
    outs = [o for o in _tensors(fn(*inputs)) if o.requires_grad]
    gouts = [torch.randn_like(o) for o in outs]

    def bwd():
        return torch.autograd.grad(outs, grads_of, gouts, retain_graph=True, allow_unused=True)
    return bwd


@dataclasses.dataclass
class Context:
    device: str
    timing: TimingConfig
    env: dict[str, Any]
    copy_bw_gbps: float
    run_id: str
    timer: Timer
    suite: str = ""
    verbose: bool = True

    @classmethod
    def create(cls, device: str, timing: TimingConfig | None = None, suite: str = "",
               verbose: bool = True) -> "Context":
        timing = timing or TimingConfig()
        env = environment(device)
        bw = copy_bandwidth(device)
        run_id = env["timestamp"] + "-" + os.urandom(3).hex()
        if verbose:
            print(f"# {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | git {env['git_sha']} | "
                  f"copy bandwidth {bw:.1f} GB/s (measured now)", flush=True)
        return cls(device, timing, env, bw, run_id, Timer(device, timing), suite, verbose)


def shape_text(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def run_case(ctx: Context, case: Case) -> list[dict[str, Any]]:
    """Time every runnable provider of `case` in every mode; rows carry ratios to every other
    provider measured here (speedup_vs[p] = p's median / this median)."""
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    probe = case.make_inputs()
    set_bytes = max(_nbytes(probe), 1)
    # Enough input sets to span 3x the cache, so no call finds its inputs cached (cap: 8 sets).
    n_sets = int(min(8, max(1, math.ceil(3 * cache_bytes(ctx.device) / set_bytes))))
    sets = [probe] + [case.make_inputs() for _ in range(n_sets - 1)]
    for provider in case.providers:
        if provider.why_not is not None:
            if ctx.verbose:
                print(f"  skip {case.op}/{provider.name} [{shape_text(case.shape)}]: {provider.why_not}")
            continue
        for mode in case.modes:
            try:
                steps = [_make_step(mode, provider.fn, s, case) for s in sets]
                timing = ctx.timer.time(lambda i: steps[i % len(steps)]())
                mem = peak_memory(ctx.device, steps[0])
            except Exception as e:  # one failing provider must not lose the others' rows
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if ctx.verbose:
                    print(f"  FAIL {case.op}/{provider.name}/{mode} [{shape_text(case.shape)}]: {msg}",
                          flush=True)
                continue
            finally:
                steps = None
            row = dict(op=case.op, provider=provider.name, mode=mode, shape=dict(case.shape),
                       dtype=DTYPE_NAMES.get(case.dtype, str(case.dtype)), median_ms=timing.median_ms,
                       p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, n_runs=timing.n, input_sets=n_sets,
                       baseline=provider.baseline, note=provider.note)
            nbytes = case.bytes_fn(mode) if case.bytes_fn and mode in MODES else None
            flops = case.flops_fn(mode) if case.flops_fn and mode in MODES else None
            sec = timing.median_ms * 1e-3
            row["bytes_model"] = nbytes
            row["gbps"] = nbytes / sec / 1e9 if nbytes else None
            row["pct_copy_bw"] = 100 * row["gbps"] / ctx.copy_bw_gbps if nbytes else None
            row["flops_model"] = flops
            row["tflops"] = flops / sec / 1e12 if flops else None
            sfu = case.sfu_fn(mode) if case.sfu_fn and mode in MODES else None
            row["sfu_ops_model"] = sfu
            row["sfu_gops"] = sfu / sec / 1e9 if sfu else None
            if case.items:
                row["throughput"] = case.items / sec
                row["throughput_unit"] = case.item_unit
            row.update(mem)
            row.update(case.extra or {})
            row["copy_bw_gbps"] = ctx.copy_bw_gbps
            row.update(ctx.env)
            row["run_id"] = ctx.run_id
            row["suite"] = ctx.suite
            rows.append(row)
            if ctx.verbose:
                print("  " + format_row_line(row), flush=True)
    for row in rows:
        row["speedup_vs"] = {o["provider"]: o["median_ms"] / row["median_ms"] for o in rows
                             if o["mode"] == row["mode"] and o["provider"] != row["provider"]}
    return rows


def format_row_line(row: dict[str, Any]) -> str:
    parts = [f"{row['op']}/{row['provider']}/{row['mode']}", shape_text(row["shape"]), row["dtype"],
             f"{row['median_ms']:.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]"]
    if row.get("gbps"):
        parts.append(f"{row['gbps']:.1f} GB/s ({row['pct_copy_bw']:.0f}% copy)")
    if row.get("throughput"):
        parts.append(f"{row['throughput']:.1f} {row['throughput_unit']}")
    if row.get("peak_mem_mb") is not None:
        parts.append(f"peak {row['peak_mem_mb']:.1f} MiB")
    return " | ".join(parts)


def append_rows(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def load_rows(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


# ----------------------------------------------------------------------------------------------
# Markdown tables (used by `python -m bench` and bench/report.py).

def _fmt(x, spec: str, empty: str = "") -> str:
    return empty if x is None else format(x, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per row; the speed-up columns name each other provider of the same case and mode."""
    head = ("| op | provider | mode | shape | dtype | median ms [p20, p80] | GB/s | % copy BW | TFLOP/s "
            "| SFU Gop/s | throughput | peak MiB | speed-up vs others |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        spd = ", ".join(f"{v:.2f}x vs {k}" for k, v in sorted(r.get("speedup_vs", {}).items()))
        thr = f"{r['throughput']:.1f} {r['throughput_unit']}" if r.get("throughput") else ""
        lines.append(
            f"| {r['op']} | {r['provider']} | {r['mode']} | {shape_text(r['shape'])} | {r['dtype']} "
            f"| {r['median_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] | {_fmt(r.get('gbps'), '.1f')} "
            f"| {_fmt(r.get('pct_copy_bw'), '.1f')} | {_fmt(r.get('tflops'), '.3f')} "
            f"| {_fmt(r.get('sfu_gops'), '.1f')} | {thr} "
            f"| {_fmt(r.get('peak_mem_mb'), '.1f')} | {spd} |")
    return "\n".join(lines)
