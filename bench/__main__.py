"""`python -m bench`: run a benchmark suite, append its rows to bench/results/, print the table.

Examples:
  python -m bench                       # CPU suite (< 5 min on 2 cores) -> bench/results/cpu-<cpu>.jsonl
  python -m bench --quick --no-save     # seconds; nothing written
  python -m bench --device cuda         # GPU sweep -> bench/results/<gpu name>.jsonl
  python -m bench --device cuda --suite gpu-check --ops cross_selective_scan,model
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

from bench import harness, suites

# op group -> the module that builds its cases (see bench.suites for the shapes)
OPS = {
    "selective_scan": "bench.bench_selective_scan",
    "cross_selective_scan": "bench.bench_cross_selective_scan",
    "memory_attention": "bench.bench_memory_attention",
    "block": "bench.bench_block",
    "model": "bench.bench_model",
}

TIMING = {
    "quick": harness.TimingConfig(warmup_ms=5, min_time_ms=30, min_reps=3, max_reps=20, max_time_ms=600),
    "cpu": harness.TimingConfig(warmup_ms=50, min_time_ms=300, min_reps=5, max_reps=50, max_time_ms=3000),
    "cuda": harness.TimingConfig(warmup_ms=25, min_time_ms=100, min_reps=10, max_reps=500, max_time_ms=1000),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--ops", default=",".join(OPS),
                    help=f"comma-separated op groups (default: all of {','.join(OPS)})")
    ap.add_argument("--suite", choices=suites.SUITES, default=None,
                    help="shape set (default: cpu on --device cpu, gpu on --device cuda); see bench/suites.py")
    ap.add_argument("--quick", action="store_true", help="the quick suite with short timing (seconds)")
    ap.add_argument("--out", default=None, help="JSONL file to append rows to (default: bench/results/<machine>.jsonl)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no rows")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.quick:
        if args.suite not in (None, "quick"):
            ap.error(f"--quick runs the quick suite; it cannot be combined with --suite {args.suite}")
        args.suite = "quick"
    args.suite = args.suite or ("gpu" if args.device == "cuda" else "cpu")
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        ap.error(f"--ops must name op groups from {list(OPS)}, got unknown {unknown}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a visible CUDA device; torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from memorymamba._backend import ENV_VAR
    if os.environ.pop(ENV_VAR, None) is not None:
        # providers name their backends; the variable would silently reroute backend=None ones
        print(f"# ignoring {ENV_VAR} for this run", flush=True)
    timing = TIMING["quick" if args.suite == "quick" else args.device]
    out = None if args.no_save else (args.out or harness.default_results_path(args.device))
    t0 = time.perf_counter()
    ctx = harness.Context.create(args.device, timing, suite=args.suite)
    print(f"# suite {args.suite}, ops {','.join(args.ops)}, rows -> {out or '(not saved)'}", flush=True)
    rows, failures = [], 0
    for group in args.ops:
        module = importlib.import_module(OPS[group])
        for g in suites.grid(group, args.suite):
            try:
                case = module.case(g, args.device)
            except Exception as e:  # a missing module/op must not stop the other groups
                failures += 1
                print(f"  FAIL building {group} case {g}: {type(e).__name__}: {e}", flush=True)
                continue
            print(f"{case.op} [{harness.shape_text(case.shape)}] {harness.DTYPE_NAMES[case.dtype]}", flush=True)
            case_rows = harness.run_case(ctx, case)
            del case
            if args.device == "cuda":
                torch.cuda.empty_cache()
            if out and case_rows:
                harness.append_rows(out, case_rows)
            rows.extend(case_rows)
    print()
    print(harness.markdown_table(rows))
    from bench.report import criteria_lines
    print()
    for line in criteria_lines(rows):
        print(line)
    print(f"\n# {len(rows)} rows in {time.perf_counter() - t0:.0f} s" + (f", appended to {out}" if out else ""))
    return 1 if failures and not rows else 0


if __name__ == "__main__":
    sys.exit(main())
