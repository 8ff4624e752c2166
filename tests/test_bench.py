"""Smoke tests of the benchmark harness, CLI, report and GPU-check script (CPU only, seconds)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bench import harness, report
from bench.__main__ import main as bench_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = harness.TimingConfig(warmup_ms=1, min_time_ms=5, min_reps=3, max_reps=10, max_time_ms=500)


def test_quantiles_of_known_samples():
    t = harness._stats([5.0, 1.0, 4.0, 2.0, 3.0])
    print(t)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.n) == (3.0, 1.8, 4.2, 5)


def test_byte_models_match_design_section_5():
    # VMamba-T stage 1, batch 128, bf16: the fused in-kernel-delta forward moves ~180 MB, unfused ~1.7 GB.
    B, D, L, N, R = 128, 96, 56 * 56, 1, 6
    fused = harness.cross_selective_scan_bytes(B, D, L, N, R, torch.bfloat16, "fwd")
    unfused = harness.unfused_pipeline_bytes(B, D, L, N, torch.bfloat16)
    print(f"fused {fused / 1e6:.1f} MB, unfused {unfused / 1e9:.2f} GB")
    assert abs(fused / 1e6 - 180) < 1
    assert abs(unfused / 1e9 - 1.7) < 0.05
    assert harness.cross_selective_scan_bytes(B, D, L, N, R, torch.float32, "fwd+bwd") == 2 * (
        harness.cross_selective_scan_bytes(B, D, L, N, R, torch.bfloat16, "fwd")
        + harness.cross_selective_scan_bytes(B, D, L, N, R, torch.bfloat16, "bwd"))


def test_one_tiny_row_on_cpu_has_every_field_and_same_run_ratios():
    from bench.bench_selective_scan import make_case

    ctx = harness.Context(device="cpu", timing=FAST, env=harness.environment("cpu"),
                          copy_bw_gbps=harness.copy_bandwidth("cpu", 8 << 20, FAST), run_id="test",
                          timer=harness.Timer("cpu", FAST), suite="test", verbose=False)
    case = make_case(batch=1, dim=3, side=5, N=2, dtype=torch.float32, device="cpu", modes=("fwd", "fwd+bwd"))
    rows = harness.run_case(ctx, case)
    for r in rows:
        print(harness.format_row_line(r))
    providers = {r["provider"] for r in rows}
    assert {"torch", "ref"} <= providers  # the pure-PyTorch scans always run; the loop ref at this size
    for r in rows:
        for field in ("op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps",
                      "pct_copy_bw", "tflops", "peak_mem_mb", "speedup_vs", "device", "torch", "cuda",
                      "git_sha", "timestamp", "run_id", "copy_bw_gbps"):
            assert field in r, field
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["bytes_model"] / (r["median_ms"] * 1e-3) / 1e9)
        others = [o for o in rows if o["mode"] == r["mode"] and o["provider"] != r["provider"]]
        assert set(r["speedup_vs"]) == {o["provider"] for o in others}
        for o in others:
            assert r["speedup_vs"][o["provider"]] == pytest.approx(o["median_ms"] / r["median_ms"])
    json.dumps(rows)  # every row is JSON-serialisable


def test_cli_writes_rows_and_report_updates_readme_markers(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cpu-test.jsonl"
    assert bench_main(["--quick", "--ops", "memory_attention", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    rows = harness.load_rows(str(out))
    print(printed)
    assert rows and all(r["suite"] == "quick" and r["op"] == "memory_attention" for r in rows)
    assert "| memory_attention | torch |" in printed

    monkeypatch.setattr(report, "RESULTS_DIR", str(tmp_path))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:cpu:start -->\nold\n<!-- bench:cpu:end -->\n"
                      "<!-- bench:gpu:start -->\nold\n<!-- bench:gpu:end -->\nend\n")
    for r in rows:  # the README's CPU table shows the cpu suite only
        r["suite"] = "cpu"
    harness.append_rows(str(tmp_path / "cpu-suite.jsonl"), rows)
    assert report.update_readme(str(readme))
    text = readme.read_text()
    print(text)
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| memory_attention | batch=8" in text and "No GPU rows yet" in text


def test_cli_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench_main(["--ops", "selective_scan,nonsense", "--no-save"])


def test_checks_pass_and_fail_on_measured_ratios():
    base = dict(op="cross_selective_scan", mode="fwd+bwd", dtype="fp32", run_id="r", device_type="cpu",
                shape=dict(batch=8, dim=96, H=56, W=56, N=1, R=6))
    rows = [dict(base, provider="fused-cpu", median_ms=1.0), dict(base, provider="torch", median_ms=25.0)]
    lines = report.criteria_lines(rows)
    print("\n".join(lines))
    assert lines[0].startswith("PASS") and "25.00" in lines[0]
    rows[1]["median_ms"] = 19.0
    assert report.criteria_lines(rows)[0].startswith("FAIL")
    rows[1]["run_id"] = "other"  # ratios across runs are not evidence
    assert report.criteria_lines(rows)[0].startswith("n/a")


def test_device_check_script_is_valid_bash():
    script = os.path.join(REPO, "bench", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        print(res.stdout)
        assert res.returncode == 0


@pytest.mark.slow
def test_device_check_dry_run_writes_its_files(tmp_path):
    script = os.path.join(REPO, "bench", "gpu_check.sh")
    env = dict(os.environ, MEMORYMAMBA_GIT_SHA="test", MEMORYMAMBA_GPU_CHECK_BUDGET_S="240",
               PYTHON=sys.executable)  # the interpreter running the tests, not whatever python3 is on PATH
    subprocess.run([script, str(tmp_path), "--dry-run"], check=True, env=env, timeout=300)
    names = sorted(os.listdir(tmp_path))
    print(names, (tmp_path / "summary.txt").read_text())
    assert {"summary.txt", "env.txt", "bench.log", "cpu-dry-run.jsonl", "report.md"} <= set(names)
    assert len(names) <= 8 and all(os.path.isfile(tmp_path / n) for n in names)
    assert "OK      bench" in (tmp_path / "summary.txt").read_text()
    assert "OK      profile" in (tmp_path / "summary.txt").read_text()
    assert "memorymamba_nano, batch 4" in (tmp_path / "bench.log").read_text()  # the profile's table
