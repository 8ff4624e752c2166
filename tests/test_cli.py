"""The `memorymamba` command: help, config precedence, errors as one line + exit 2, eval/predict/data/info."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from memorymamba.cli import main
from memorymamba.config import resolve

TINY_ARGS = ["--image-size", "32", "--set", "synthetic_train_per_class=4", "--set", "synthetic_val_per_class=2",
             "--set", "synthetic_test_per_class=2", "--batch-size", "8", "--epochs", "1", "--threads", "1",
             "--no-progress", "--model-arg", "depths=[1,1,1,1]", "--model-arg", "dims=8"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMORYMAMBA_CACHE", str(tmp_path / "cache"))


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "memorymamba", "--help"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "usage: memorymamba" in out.stdout and "train" in out.stdout


@pytest.mark.parametrize("cmd", [["train"], ["eval"], ["predict"], ["data"], ["data", "audit"], ["data", "generate"],
                                 ["info"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: memorymamba {' '.join(cmd)}" in capsys.readouterr().out


def test_config_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"lr": 0.01, "epochs": 3, "data": str(tmp_path), "model_args": {"dims": 8}}))
    from memorymamba.config import load_file
    cfg = resolve(load_file(str(f)), {"epochs": 5, "model_args": {"depths": [1, 1, 1, 1]}})
    assert (cfg.lr, cfg.epochs, cfg.recipe, cfg.image_size) == (0.01, 5, "paper", 224)  # CLI wins; paper recipe
    assert cfg.model_args == {"dims": 8, "depths": [1, 1, 1, 1]}
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"train": {"batch_size": 16}}))
    cfg = resolve(load_file(str(j)))
    assert (cfg.batch_size, cfg.recipe, cfg.image_size, cfg.lr) == (16, "synthetic", 64, 1e-3)


def _error(capsys, argv, pattern):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    print(err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and pattern in last and "Traceback" not in err


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    _error(capsys, ["train", "--data", str(tmp_path / "missing")], "does not exist")
    (tmp_path / "empty").mkdir()
    _error(capsys, ["train", "--data", str(tmp_path / "empty")], "no images found under")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    _error(capsys, ["train", "--config", str(bad)], "is not valid YAML")
    bad.write_text("learnin_rate: 1\n")
    _error(capsys, ["train", "--config", str(bad)], "unknown key 'learnin_rate'")
    _error(capsys, ["eval", str(tmp_path / "nope.pt")], "does not exist")
    _error(capsys, ["data", "audit", str(tmp_path / "nope")], "does not exist")
    _error(capsys, ["train", "--resume", str(tmp_path), "--lr", "1"], "--resume continues a run")


def _class_tree(root, classes, n=3, size=20):
    for c in classes:
        for j in range(n):
            p = root / c / f"{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.default_rng(hash((c, j)) % 999).integers(0, 256, (size, size), dtype=np.uint8)).save(p)


def test_train_eval_predict_end_to_end(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    assert main(["train", *TINY_ARGS, "--output", runs, "--name", "r"]) == 0
    run = os.path.join(runs, "r")
    assert main(["eval", run, "--split", "val"]) == 0
    rep = json.loads(open(os.path.join(run, "eval-val", "report.json")).read())
    assert rep["split"] == "val" and rep["test"]["n"] == 12 and "macro_f1" in rep["test"]
    assert os.path.isfile(os.path.join(run, "eval-val", "confusion.png"))
    # predict on a folder with one corrupt file and one non-image: both skipped, the rest classified
    imgs = tmp_path / "imgs"
    _class_tree(imgs, ["q"], n=3, size=40)
    (imgs / "q" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (imgs / "q" / "notes.txt").write_text("hi")
    out = tmp_path / "pred.csv"
    assert main(["predict", run, str(imgs), "-o", str(out), "--top-k", "2"]) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 3 and set(rows[0]) == {"path", "class", "probability", "top_k"}
    for r in rows:
        top = r["top_k"].split(";")
        assert len(top) == 2 and top[0].split(":")[0] == r["class"]
        assert float(top[0].split(":")[1]) >= float(top[1].split(":")[1])
    assert main(["predict", run, str(imgs / "q" / "*.png"), "-o", str(out)]) == 0
    # a checkpoint trained on 6 classes against a 2-class dataset: named error
    _class_tree(tmp_path / "two", ["a", "b"])
    _error(capsys, ["eval", run, "--data", str(tmp_path / "two")], "has 6 classes")
    _error(capsys, ["train", "--resume", run], "already finished")


def test_single_class_and_data_commands(tmp_path, capsys):
    _class_tree(tmp_path / "one", ["only"])
    _error(capsys, ["train", "--data", str(tmp_path / "one")], "single class 'only'")
    gen = tmp_path / "gen"
    assert main(["data", "generate", str(gen), "--image-size", "24", "--train-per-class", "2",
                 "--val-per-class", "1", "--test-per-class", "1"]) == 0
    assert sorted(os.listdir(gen / "train")) == ["crazing", "inclusion", "patches", "pitted_surface",
                                                 "rolled-in_scale", "scratches"]
    capsys.readouterr()
    assert main(["data", "audit", str(gen), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"]["train"]["scratches"] == 2 and rep["duplicates_across"] == []
    assert main(["info"]) == 0
    assert capsys.readouterr().out.strip()
