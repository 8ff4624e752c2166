"""Synthetic generator, dataset layouts, audit, splits and image loading (tiny fake datasets)."""
import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from memorymamba.data import (DataError, SyntheticSpec, audit, detect_format, discover, format_audit, load_split,
                              make_splits, stratified_split, subsample_train)
from memorymamba.data import synthetic
from memorymamba.data.synthetic import CLASSES, draw, generate_arrays


def _img(path, seed, size=(12, 10), mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    elif mode == "I;16":
        a = rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16)
    else:
        a = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(a).save(path)  # uint16 arrays become mode I;16


# --------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic_and_distinct():
    spec = SyntheticSpec(train_per_class=3, val_per_class=2, test_per_class=2, image_size=40, seed=5)
    a, la = generate_arrays(spec, "train")
    b, lb = generate_arrays(spec, "train")
    t, _ = generate_arrays(spec, "test")
    assert a.shape == (18, 40, 40) and a.dtype == np.uint8 and (la == lb).all() and np.array_equal(a, b)
    assert not any(np.array_equal(x, y) for x in a for y in t), "train and test images must differ"
    c, _ = generate_arrays(SyntheticSpec(3, 2, 2, 40, seed=6), "train")
    assert not np.array_equal(a, c)
    assert np.bincount(la).tolist() == [3] * 6


def test_write_tree_parallel_equals_sequential(tmp_path, monkeypatch):
    spec = SyntheticSpec(train_per_class=2, val_per_class=1, test_per_class=1, image_size=24, seed=3)
    par = synthetic.write_tree(spec, str(tmp_path / "par"))
    monkeypatch.setattr(synthetic, "_workers", lambda jobs: 1)
    seq = synthetic.write_tree(spec, str(tmp_path / "seq"))
    files = sorted(os.path.relpath(os.path.join(d, f), seq) for d, _, fs in os.walk(seq) for f in fs)
    assert len(files) == 6 * 4 + 1 and "train/crazing/crazing_0002.png" in files
    assert sorted(os.path.relpath(os.path.join(d, f), par) for d, _, fs in os.walk(par) for f in fs) == files
    for f in files:
        with open(os.path.join(seq, f), "rb") as a, open(os.path.join(par, f), "rb") as b:
            assert a.read() == b.read(), f
    x, _ = generate_arrays(spec, "val")  # the same pixels as the in-memory generator
    assert np.array_equal(np.array(Image.open(os.path.join(par, "val", CLASSES[1], f"{CLASSES[1]}_0001.png"))), x[1])


def test_global_statistics_do_not_reveal_the_class():
    """A logistic regression on mean, std and a 16-bin histogram must stay under 60% on the default
    test split; shape, not intensity, carries the class. It is fitted on the first 300 images per
    class of the default train split (every image has its own seed, so a smaller spec draws exactly
    those): 18 features need no more, and drawing all of them would double the test's time."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    spec = SyntheticSpec()
    train_spec = dataclasses.replace(spec, train_per_class=min(spec.train_per_class, 300))

    def feats(x):
        x = x.reshape(len(x), -1).astype(np.float64) / 255
        h = np.stack([np.histogram(r, bins=16, range=(0, 1))[0] / r.size for r in x])
        return np.concatenate([x.mean(1, keepdims=True), x.std(1, keepdims=True), h], 1)

    xtr, ytr = generate_arrays(train_spec, "train")
    xte, yte = generate_arrays(spec, "test")
    sc = StandardScaler().fit(feats(xtr))
    clf = LogisticRegression(max_iter=3000).fit(sc.transform(feats(xtr)), ytr)
    acc = clf.score(sc.transform(feats(xte)), yte)
    print(f"logistic regression on global statistics: test accuracy {acc:.3f} (chance {1 / len(CLASSES):.3f})")
    assert acc < 0.60


def test_draw_covers_every_class_with_structure():
    # each class image deviates from a smooth surface somewhere: its strongest local contrast is high
    for label in range(len(CLASSES)):
        img = draw(np.random.default_rng([1, label]), label, 48)
        assert img.shape == (48, 48) and img.std() > 10, CLASSES[label]


# --------------------------------------------------------------------------- layouts

def test_neu_flat(tmp_path):
    for i, p in enumerate(["Cr", "In", "Pa", "PS", "RS", "Sc"]):
        for j in range(1, 4):
            _img(tmp_path / f"{p}_{j}.bmp", 10 * i + j)
    (tmp_path / "readme.txt").write_text("x")
    assert detect_format(str(tmp_path)) == "neu"
    idx = discover(str(tmp_path))
    assert idx.classes == list(CLASSES) and len(idx.splits["all"]) == 18
    assert any(p.endswith("readme.txt") and "not an image" in r for p, r in idx.skipped)


def test_neu_mirror_train_valid_test(tmp_path):
    for split, n in (("train", 4), ("valid", 2), ("test", 2)):
        for c in ("Crazing", "Inclusion", "Scratches"):
            for j in range(n):
                _img(tmp_path / split / c / f"{c}_{j}.bmp", hash((split, c, j)) % 1000)
    idx = discover(str(tmp_path))
    assert set(idx.splits) == {"train", "val", "test"} and idx.classes == ["Crazing", "Inclusion", "Scratches"]
    s = make_splits(idx)
    assert [len(s[k]) for k in ("train", "val", "test")] == [12, 6, 6]


def test_class_folders_train_val_tree_carves_validation(tmp_path):
    for split, n in (("train", 10), ("val", 3)):
        for c in ("a", "b"):
            for j in range(n):
                _img(tmp_path / split / c / f"{j}.png", 100 * (split == "val") + 10 * (c == "b") + j)
    s = make_splits(discover(str(tmp_path)), val_fraction=0.2, seed=1)
    # the given val becomes the test split; a stratified val is carved from train
    assert len(s["test"]) == 6 and len(s["val"]) == 4 and len(s["train"]) == 16
    assert not {x.path for x in s["val"]} & {x.path for x in s["train"]}


def test_gc10_multilabel_from_folder_and_xml(tmp_path):
    for folder, names in (("1", ["a1", "a2"]), ("3", ["c1", "c2"]), ("10", ["j1", "j2"])):
        for n in names:
            _img(tmp_path / folder / f"{n}.jpg", hash(n) % 999)
    os.makedirs(tmp_path / "lable")
    xml = "<annotation>{}</annotation>"
    obj = "<object><name>{}</name></object>"
    (tmp_path / "lable" / "a1.xml").write_text(xml.format(obj.format("1_chongkong") + obj.format("3_yueyawan")))
    (tmp_path / "lable" / "c1.xml").write_text(xml.format(obj.format("3_yueyawan")))
    assert detect_format(str(tmp_path)) == "gc10"
    idx = discover(str(tmp_path))
    assert idx.classes == ["punching_hole", "crescent_gap", "waist_folding"]
    rep = audit(str(tmp_path))
    assert [m["path"].endswith("a1.jpg") for m in rep["multi_label"]] == [True]
    assert rep["multi_label"][0]["xml_classes"] == ["crescent_gap", "punching_hole"]
    assert "multi-label images" in format_audit(rep)


def test_magnetic_tile_masks_excluded(tmp_path):
    for c in ("Blowhole", "Free"):
        for j in range(3):
            _img(tmp_path / f"MT_{c}" / "Imgs" / f"exp{j}.jpg", j + 10 * (c == "Free"))
            _img(tmp_path / f"MT_{c}" / "Imgs" / f"exp{j}.png", 50 + j)  # the mask
    idx = discover(str(tmp_path))
    assert idx.format == "mt" and idx.classes == ["Blowhole", "Free"]
    assert all(s.path.endswith(".jpg") for s in idx.splits["all"]) and len(idx.splits["all"]) == 6
    assert sum(r == "mask" for _, r in idx.skipped) == 6


def test_bad_folders_named(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        discover(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found under .*empty"):
        discover(str(tmp_path / "empty"))
    for j in range(3):
        _img(tmp_path / "one" / "only" / f"{j}.png", j)
    with pytest.raises(DataError, match=r"single class 'only'"):
        discover(str(tmp_path / "one"))
    with pytest.raises(DataError, match="--format must be one of"):
        discover(str(tmp_path / "one"), "coco")


# --------------------------------------------------------------------------- audit and loading

def test_audit_duplicates_unreadable_and_modes(tmp_path):
    for split in ("train", "test"):
        for c in ("x", "y"):
            for j in range(3):
                _img(tmp_path / split / c / f"{j}.png", hash((split, c, j)) % 10000)
    # same pixels in another format within train, and across train/test
    Image.open(tmp_path / "train" / "x" / "0.png").save(tmp_path / "train" / "x" / "copy.bmp")
    Image.open(tmp_path / "train" / "y" / "1.png").save(tmp_path / "test" / "y" / "leak.png")
    data = (tmp_path / "train" / "y" / "2.png").read_bytes()
    (tmp_path / "train" / "y" / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "train" / "y" / "notes.csv").write_text("a,b")
    _img(tmp_path / "test" / "x" / "rgb.png", 7, mode="RGB")
    rep = audit(str(tmp_path))
    print(format_audit(rep))
    assert rep["counts"]["train"] == {"x": 4, "y": 3} and rep["counts"]["test"] == {"x": 4, "y": 4}
    assert len(rep["duplicates_within"]) == 1 and rep["duplicates_within"][0]["split"] == "train"
    assert len(rep["duplicates_across"]) == 1 and rep["duplicates_across"][0]["splits"] == ["test", "train"]
    assert [p.endswith("trunc.png") for p, _ in rep["unreadable"]] == [True]
    assert any(p.endswith("notes.csv") for p, _ in rep["skipped"])
    assert rep["modes"]["test"] == {"L": 7, "RGB": 1}
    assert abs(rep["imbalance_ratio"]["train"] - 4 / 3) < 1e-12


def test_load_split_skips_corrupt_and_converts_mixed_modes(tmp_path):
    from memorymamba.data import Sample
    _img(tmp_path / "g.png", 1, size=(9, 7))
    _img(tmp_path / "c.png", 2, mode="RGB")
    _img(tmp_path / "w.png", 3, mode="I;16")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    samples = [Sample(str(tmp_path / n), i % 2) for i, n in enumerate(["g.png", "c.png", "w.png", "bad.jpg"])]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, y, kept = load_split(samples, 16, 1, "train")
    msgs = [str(m.message) for m in w]
    print(msgs)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 0]
    assert any("bad.jpg" in m for m in msgs)
    assert sum("modes" in m for m in msgs) == 1, "mixed modes warn once per split"
    x3, _, _ = load_split(samples[:3], 16, 3, "val")
    assert x3.shape == (3, 3, 16, 16)
    # 16-bit rescales into 0..255 instead of saturating
    assert 60 < x[2].float().mean() < 200


def test_stratified_split_and_subsample():
    labels = np.repeat(np.arange(5), [40, 23, 11, 7, 3])
    parts = stratified_split(labels, {"train": 0, "val": 0.2, "test": 0.2}, seed=3)
    allidx = np.concatenate(list(parts.values()))
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    for name in ("val", "test"):
        counts = np.bincount(labels[parts[name]], minlength=5)
        assert (counts >= 1).all() and abs(counts[0] - 8) <= 1
    again = stratified_split(labels, {"train": 0, "val": 0.2, "test": 0.2}, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    lab = np.repeat(np.arange(6), 50)
    keep = subsample_train(lab, imbalance=10, seed=0)
    c = np.bincount(lab[keep])
    assert c[0] == 50 and c[-1] == 5 and (np.diff(c) <= 0).all()
    c = np.bincount(lab[subsample_train(lab, few_shot=4, seed=0)])
    assert c.tolist() == [4] * 6
    with pytest.raises(DataError, match="imbalance must be >= 1"):
        subsample_train(lab, imbalance=0.5)
