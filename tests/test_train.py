"""Training loop: run folder, bit-for-bit resume after a mid-epoch kill, bad resumes, baselines, ablations."""
import json
import os

import pytest
import torch

from memorymamba.config import ConfigError, resolve
from memorymamba.train import RunError, load_checkpoint, train

TINY = dict(image_size=32, synthetic_train_per_class=5, synthetic_val_per_class=2, synthetic_test_per_class=2,
            batch_size=8, epochs=2, lr=2e-3, progress=False, threads=1,
            model_args={"depths": [1, 1, 1, 1], "dims": 8, "coarse_memory_size": 3, "fine_memory_size": 3})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMORYMAMBA_CACHE", str(tmp_path / "cache"))


def _cfg(tmp_path, **kw):
    return resolve(overrides={**TINY, "output": str(tmp_path / "runs"), **kw})


def test_run_folder_and_report(tmp_path):
    rep = train(_cfg(tmp_path, name="a", imbalance=3.0))
    run = tmp_path / "runs" / "a"
    for f in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "report.json", "curves.png", "confusion.png"):
        assert (run / f).is_file(), f
    assert not [f for f in os.listdir(run) if ".tmp" in f], "temp files of atomic saves must not remain"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rep["test"]["n"] == 12 and sum(rep["train_counts"]) < 30  # imbalance subsampled train
    assert rep["balance"] == "weight"
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["test"]["accuracy"] == rep["test"]["accuracy"]
    ck = load_checkpoint(str(run))
    assert ck["epoch"] == 2 and ck["classes"][0] == "crazing" and {"optimizer", "scheduler", "rng"} <= set(ck)


def test_resume_after_kill_is_bit_exact(tmp_path, monkeypatch):
    straight = train(_cfg(tmp_path, name="straight"))
    import memorymamba.train as T
    real = T.evaluate_tensors
    calls = {"n": 0}

    def killed_in_epoch_2(*a, **k):  # the process dies after epoch 2's training steps, before its checkpoint
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "evaluate_tensors", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, name="killed"))
    monkeypatch.setattr(T, "evaluate_tensors", real)
    assert load_checkpoint(str(tmp_path / "runs" / "killed"))["epoch"] == 1  # lost only the epoch in flight
    resumed = train(resume=str(tmp_path / "runs" / "killed"))
    a = load_checkpoint(str(tmp_path / "runs" / "straight" / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "runs" / "killed" / "last.pt"))["model"]
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max weight difference straight vs resumed: {diff}")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in hs]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])


def test_resume_of_finished_run_and_bad_checkpoint(tmp_path):
    train(_cfg(tmp_path, name="done", epochs=1))
    with pytest.raises(RunError, match=r"already finished \(1/1 epochs\)"):
        train(resume=str(tmp_path / "runs" / "done"))
    with pytest.raises(RunError, match="already holds a run"):
        train(_cfg(tmp_path, name="done", epochs=1))
    bogus = tmp_path / "x.pt"
    torch.save({"weights": torch.randn(3)}, bogus)
    with pytest.raises(RunError, match="not a memorymamba training checkpoint"):
        load_checkpoint(str(bogus))


@pytest.mark.parametrize("switches", [{"use_fusion": False}, {"use_coarse_memory": False, "use_fine_memory": False},
                                      {"similarity": "l2"}])
def test_ablation_switches_train(tmp_path, switches):
    rep = train(_cfg(tmp_path, name="abl", epochs=1, model_args={**TINY["model_args"], **switches}))
    assert 0 <= rep["test"]["accuracy"] <= 1 and rep["history"][0]["train_loss"] > 0


def test_resnet_baseline_and_pretrained_file(tmp_path):
    import torchvision
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)  # RGB stem, 1000-way head
    rep = train(_cfg(tmp_path, name="r18", epochs=1, model="resnet18", pretrained=str(weights), model_args={}))
    assert rep["params"] > 10e6 and rep["test"]["n"] == 12


def test_config_errors_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        resolve(overrides={"learning_rate": 1})
    with pytest.raises(ConfigError, match="epochs must be int"):
        resolve(overrides={"epochs": "ten"})
    with pytest.raises(ConfigError, match="--model must be one of"):
        train(_cfg(tmp_path, name="m", model="vit"))
    with pytest.raises(ConfigError, match="model_args for memorymamba_nano"):
        train(_cfg(tmp_path, name="m2", model_args={"depth": 3}))


def test_auto_threads_are_recorded_for_resume(tmp_path, monkeypatch):
    # threads=0 picks a count at start; the run's config keeps it, so --resume uses the same count.
    import memorymamba.train as T
    monkeypatch.setattr(T, "auto_threads", lambda: (1, 0.7))
    before = torch.get_num_threads()
    try:
        train(_cfg(tmp_path, name="auto", threads=0, epochs=1))
    finally:
        torch.set_num_threads(before)
    assert load_checkpoint(str(tmp_path / "runs" / "auto"))["config"]["threads"] == 1
    assert "threads: 1" in (tmp_path / "runs" / "auto" / "config.yaml").read_text()


def test_auto_threads_leave_busy_cores(monkeypatch):
    import memorymamba.train as T
    monkeypatch.setattr(T, "usable_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    for busy, want in ((0.1, 4), (1.2, 3), (3.9, 1), (8.0, 1)):
        monkeypatch.setattr(T, "busy_cores", lambda b=busy: b)
        assert T.auto_threads() == (want, busy)
    monkeypatch.setattr(T, "busy_cores", lambda: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun ranks on one machine split the idle cores
    assert T.auto_threads()[0] == 2
