"""`python -m bench.report`: README tables generated from bench/results/*.jsonl, plus the issues'
"done when" checks evaluated on measured rows.

  python -m bench.report               # print the CPU and GPU markdown and the checks
  python -m bench.report --update      # also rewrite README.md between the bench markers:
      <!-- bench:cpu:start --> ... <!-- bench:cpu:end -->   the latest `cpu`-suite rows of each CPU file
      <!-- bench:gpu:start --> ... <!-- bench:gpu:end -->   the latest `gpu-check`-suite rows of each GPU
                                                               file, its charts if bench/plot.py made them
Rows are never typed: each table line is a stored row, and its speed-ups were measured in that row's run.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Any, Callable

from bench.harness import REPO, RESULTS_DIR, load_rows, shape_text

README = os.path.join(REPO, "README.md")
TABLE_SUITE = {"cpu": "cpu", "gpu": "gpu-check"}


def _key(row: dict[str, Any]) -> tuple:
    return (row["op"], row["provider"], row["mode"], shape_text(row["shape"]), row["dtype"])


def latest(rows: list[dict[str, Any]], suite: str | None = None) -> list[dict[str, Any]]:
    """The most recent row of each (op, provider, mode, shape, dtype), in first-seen order."""
    if suite is not None:
        rows = [r for r in rows if r.get("suite") == suite]
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        k = _key(r)
        if k not in best or r["timestamp"] >= best[k]["timestamp"]:
            best[k] = r
    return list(best.values())


def result_files() -> dict[str, list[str]]:
    files = sorted(glob.glob(os.path.join(RESULTS_DIR, "*.jsonl")))
    return {"cpu": [f for f in files if os.path.basename(f).startswith("cpu-")],
            "gpu": [f for f in files if not os.path.basename(f).startswith("cpu-")]}


def _f(x, spec):
    return "" if x is None else format(x, spec)


def compact_table(rows: list[dict[str, Any]]) -> str:
    """README table: one line per stored row; speed-ups only against the baseline providers."""
    lines = ["| op | shape | dtype | mode | provider | median ms [p20, p80] | GB/s | % copy BW | TFLOP/s "
             "| SFU Gop/s | img/s | peak MiB | speed-up vs baselines |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    baselines = {r["provider"] for r in rows if r.get("baseline")}
    for r in rows:
        spd = ", ".join(f"{v:.2f}x vs {k}" for k, v in sorted(r.get("speedup_vs", {}).items())
                        if k in baselines and not r.get("baseline"))
        lines.append(
            f"| {r['op']} | {shape_text(r['shape'])} | {r['dtype']} | {r['mode']} | {r['provider']} "
            f"| {r['median_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] | {_f(r.get('gbps'), '.1f')} "
            f"| {_f(r.get('pct_copy_bw'), '.1f')} | {_f(r.get('tflops'), '.3f')} | {_f(r.get('sfu_gops'), '.1f')} "
            f"| {_f(r.get('throughput'), '.1f')} "
            f"| {_f(r.get('peak_mem_mb'), '.1f')} | {spd} |")
    return "\n".join(lines)


def _machine_line(rows: list[dict[str, Any]]) -> str:
    r = max(rows, key=lambda x: x["timestamp"])
    shas = sorted({x["git_sha"] for x in rows})
    return (f"**{r['device']}** -- torch {r['torch']}, CUDA {r['cuda']}, git {', '.join(shas)}, "
            f"latest row {r['timestamp']}, copy bandwidth measured in the run: {r['copy_bw_gbps']:.1f} GB/s"
            + (f", load average {r['load_avg_1m']} at its start" if r.get("load_avg_1m") is not None
               and r["device_type"] == "cpu" else ""))


def section(kind: str) -> str:
    """Markdown for the CPU or GPU marker block."""
    parts = []
    for path in result_files()[kind]:
        rows = latest(load_rows(path), TABLE_SUITE[kind])
        if not rows:
            continue
        parts.append(_machine_line(rows))
        parts.append("")
        parts.append(compact_table(rows))
        parts.append("")
        checks = criteria_lines(rows)
        if checks:
            parts.extend(["Checks (issue criteria, from the rows above):", ""] + [f"- {c}" for c in checks] + [""])
        stem = os.path.splitext(os.path.basename(path))[0]
        for chart in sorted(glob.glob(os.path.join(RESULTS_DIR, stem + "-*.png"))):
            rel = os.path.relpath(chart, REPO)
            parts.append(f"![{os.path.basename(chart)}]({rel})")
        parts.append("")
    if not parts:
        return (f"No {kind.upper()} rows yet: run `python -m bench`" +
                (" on a CPU." if kind == "cpu" else " --device cuda --suite gpu-check (or bench/gpu_check.sh)."))
    return "\n".join(parts).rstrip()


def update_readme(path: str = README) -> bool:
    """Replace the text between each pair of bench markers; False if the README has none."""
    with open(path) as f:
        text = f.read()
    changed = False
    for kind in ("cpu", "gpu"):
        start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: f"{start}\n{section(kind)}\n{end}", text)
            changed = True
    if changed:
        with open(path, "w") as f:
            f.write(text)
    return changed


# ----------------------------------------------------------------------------------------------
# Issue criteria. Each check finds rows by (op, provider, mode, shape subset, dtype) and compares.

T1 = dict(dim=96, H=56, W=56, N=1)  # VMamba-T stage 1


def _find(rows, op, provider, mode, dtype, **shape):
    for r in rows:
        if (r["op"] == op and r["provider"] == provider and r["mode"] == mode and r["dtype"] == dtype
                and all(r["shape"].get(k) == v for k, v in shape.items())):
            return r
    return None


def _speedup(rows, op, mode, dtype, shape, fast, slow):
    a, b = _find(rows, op, fast, mode, dtype, **shape), _find(rows, op, slow, mode, dtype, **shape)
    if a is None or b is None or a.get("run_id") != b.get("run_id"):
        return None
    return b["median_ms"] / a["median_ms"]


def _mem_ratio(rows, op, mode, dtype, shape, fast, slow):
    a, b = _find(rows, op, fast, mode, dtype, **shape), _find(rows, op, slow, mode, dtype, **shape)
    if a is None or b is None or not a.get("peak_mem_mb") or not b.get("peak_mem_mb"):
        return None
    return a["peak_mem_mb"] / b["peak_mem_mb"]


def _pct(rows, op, provider, mode, dtype, shape):
    r = _find(rows, op, provider, mode, dtype, **shape)
    return None if r is None else r.get("pct_copy_bw")


Check = tuple[str, Callable[[list], float | None], str, float]


def _checks(device: str) -> list[Check]:
    d = device
    fused, unfused, kern = f"fused-{d}", f"unfused-{d}", f"kernel-{d}"
    if d == "cpu":
        b8 = dict(T1, batch=8)
        return [
            ("issue 3: fused-cpu fwd+bwd vs torch, T stage 1, batch 8, fp32",
             lambda r: _speedup(r, "cross_selective_scan", "fwd+bwd", "fp32", b8, fused, "torch"), ">=", 20),
            ("issue 3: tiny model train step, kernel-cpu vs torch, batch 8, fp32",
             lambda r: _speedup(r, "model", "train", "fp32", dict(model="tiny"), kern, "torch"), ">=", 5),
            ("issue 6: MemSS2D fwd+bwd, kernel-cpu vs torch, T stage 1, batch 8",
             lambda r: _speedup(r, "memss2d", "fwd+bwd", "fp32", dict(dim=96, H=56, batch=8), kern, "torch"),
             ">=", 5),
        ]
    b128 = dict(T1, batch=128)
    return [
        ("issue 3: fused fwd, % of the HBM floor (copy BW), T stage 1, batch 128, bf16",
         lambda r: _pct(r, "cross_selective_scan", fused, "fwd", "bf16", b128), ">=", 50),
        ("issue 3: fused fwd+bwd vs unfused, T stage 1, batch 128, bf16",
         lambda r: _speedup(r, "cross_selective_scan", "fwd+bwd", "bf16", b128, fused, unfused), ">=", 3),
        ("issue 3: fused fwd+bwd vs torch, T stage 1, batch 128, bf16",
         lambda r: _speedup(r, "cross_selective_scan", "fwd+bwd", "bf16", b128, fused, "torch"), ">=", 20),
        ("issue 3: fused fwd+bwd peak memory / unfused's, T stage 1, batch 128, bf16",
         lambda r: _mem_ratio(r, "cross_selective_scan", "fwd+bwd", "bf16", b128, fused, unfused), "<=", 0.5),
        ("issue 6: MemSS2D fwd time / SS2D fwd time, kernel-cuda, T stage 1, batch 128, bf16",
         lambda r: (lambda a, b: None if a is None or b is None else a["median_ms"] / b["median_ms"])(
             _find(r, "memss2d", kern, "fwd", "bf16", dim=96, H=56, batch=128),
             _find(r, "ss2d", kern, "fwd", "bf16", dim=96, H=56, batch=128)), "<=", 1.10),
        ("issue 6: MemSS2D fwd+bwd, kernel-cuda vs torch, T stage 1, batch 128, bf16",
         lambda r: _speedup(r, "memss2d", "fwd+bwd", "bf16", dict(dim=96, H=56, batch=128), kern, "torch"), ">=", 10),
        ("issue 6: MemSS2D fwd+bwd peak memory / torch's",
         lambda r: _mem_ratio(r, "memss2d", "fwd+bwd", "bf16", dict(dim=96, H=56, batch=128), kern, "torch"),
         "<=", 0.5),
        ("issue 6: tiny batch-1 224 inference latency, torch / kernel-cuda",
         lambda r: _speedup(r, "model", "infer", "bf16", dict(model="tiny", batch=1), kern, "torch"), ">=", 3),
    ]


def criteria_lines(rows: list[dict[str, Any]]) -> list[str]:
    """'PASS/FAIL/n/a <check>: value (need ...)' for the checks whose device matches the rows."""
    if not rows:
        return []
    device = rows[0]["device_type"]
    out = []
    for label, fn, op, bound in _checks(device):
        v = fn(rows)
        if v is None:
            out.append(f"n/a  {label}: rows not measured in one run here")
            continue
        ok = v >= bound if op == ">=" else v <= bound
        out.append(f"{'PASS' if ok else 'FAIL'} {label}: {v:.2f} (need {op} {bound})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", action="store_true", help=f"rewrite the marker blocks of {README}")
    ap.add_argument("--readme", default=README, help="README to update (default: the repo's)")
    ap.add_argument("--results", default=None,
                    help="report one JSONL file instead (its latest rows of --suite, with the checks)")
    ap.add_argument("--suite", default=None, help="with --results: only rows of this suite")
    args = ap.parse_args(argv)
    if args.results:
        rows = latest(load_rows(args.results), args.suite)
        if not rows:
            print(f"no rows{' of suite ' + args.suite if args.suite else ''} in {args.results}")
            return 1
        print(_machine_line(rows) + "\n\n" + compact_table(rows) + "\n")
        print("\n".join(f"- {c}" for c in criteria_lines(rows)))
        return 0
    for kind in ("cpu", "gpu"):
        print(f"<!-- bench:{kind}:start -->\n{section(kind)}\n<!-- bench:{kind}:end -->\n")
    if args.update:
        if not os.path.exists(args.readme) or not update_readme(args.readme):
            print(f"{args.readme} has no bench markers; nothing updated", file=sys.stderr)
            return 1
        print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
