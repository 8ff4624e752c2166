"""`python -m bench.plot`: one PNG per results file, <stem>-charts.png beside it (or in --out-dir).

Left panel: speed-up of each compiled provider (fused-*, kernel-*) over each baseline, per case and
mode, on a log axis, from ratios measured in the same run. Right panel: each provider's share of the
copy bandwidth measured in that run, against the op's minimum-bytes model (100% = the HBM/DRAM floor).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from bench.harness import RESULTS_DIR, load_rows, shape_text
from bench.report import latest

MAX_BARS = 60  # per panel; the newest rows win beyond that


def _label(r) -> str:
    return f"{r['op']} {shape_text(r['shape'])} {r['dtype']} {r['mode']}"


def charts(path: str, out_dir: str | None = None, suite: str | None = None) -> str | None:
    """Write the PNG for one JSONL file; returns its path, or None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest(load_rows(path), suite)
    baselines = {r["provider"] for r in rows if r.get("baseline")}
    speed = [(f"{_label(r)}: {r['provider']} vs {b}", v) for r in rows if not r.get("baseline")
             for b, v in sorted(r.get("speedup_vs", {}).items()) if b in baselines][-MAX_BARS:]
    roof = [(f"{_label(r)}: {r['provider']}", r["pct_copy_bw"]) for r in rows
            if r.get("pct_copy_bw") is not None and r["op"] in ("selective_scan", "cross_selective_scan")][-MAX_BARS:]
    if not speed and not roof:
        return None
    height = max(3.0, 0.22 * max(len(speed), len(roof)) + 1.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(18, height))
    device = rows[-1]["device"]
    if speed:
        labels, values = zip(*speed)
        ax1.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax1.set_yticks(range(len(values)), labels, fontsize=6)
        ax1.set_xscale("log")
        ax1.axvline(1.0, color="k", lw=0.8)
        ax1.set_xlabel("speed-up (baseline median / provider median), same run")
    ax1.set_title(f"speed-up over baselines -- {device}", fontsize=9)
    if roof:
        labels, values = zip(*roof)
        ax2.barh(range(len(values)), values, color="tab:blue")
        ax2.set_yticks(range(len(values)), labels, fontsize=6)
        ax2.axvline(100.0, color="k", lw=0.8)
        ax2.set_xlabel("% of the measured copy bandwidth (minimum-bytes model / time)")
    ax2.set_title(f"% of roofline (copy BW {rows[-1]['copy_bw_gbps']:.0f} GB/s) -- {device}", fontsize=9)
    fig.tight_layout()
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(out_dir or os.path.dirname(os.path.abspath(path)), stem + "-charts.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")  # long case labels: grow the canvas, not crop
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="*", default=None, help="JSONL files (default: bench/results/*.jsonl)")
    ap.add_argument("--out-dir", default=None, help="folder for the PNGs (default: beside each file)")
    ap.add_argument("--suite", default=None, help="only rows of this suite (default: all)")
    args = ap.parse_args(argv)
    paths = args.results if args.results else sorted(glob.glob(os.path.join(RESULTS_DIR, "*.jsonl")))
    for path in paths:
        out = charts(path, args.out_dir, args.suite)
        print(out or f"{path}: nothing to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
