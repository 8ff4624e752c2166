"""Find the images and labels of a defect dataset on disk, in the layouts of DESIGN section 7.

Layouts (`format=`):
  neu       NEU-CLS flat folder: Cr_1.bmp, In_*, Pa_*, PS_*, RS_*, Sc_* (label from the prefix)
  folders   class-folder tree <root>/<class>/*.ext (Aluminum, ImageFolder, anything)
  gc10      GC10-DET: class folders 1..10 plus lable/*.xml (VOC). An image may show several defect
            classes; its label is the folder it sits in (the dataset's own primary label). The XML is
            read by the audit, which counts the images whose boxes name other classes as well.
  mt        Magnetic-Tile: MT_<Class>/Imgs/*.jpg; the same-name *.png files are masks and are skipped.
  auto      detect the above; a root holding train/ and val|valid|test/ is read split by split,
            each split in any of the layouts above.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

IMAGE_EXTS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
FORMATS = ("auto", "neu", "folders", "gc10", "mt")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

NEU_PREFIXES = {"Cr": "crazing", "In": "inclusion", "Pa": "patches", "PS": "pitted_surface",
                "RS": "rolled-in_scale", "Sc": "scratches"}
GC10_CLASSES = ("punching_hole", "welding_line", "crescent_gap", "water_spot", "oil_spot", "silk_spot",
                "inclusion", "rolled_pit", "crease", "waist_folding")
_NEU_RE = re.compile(r"^(Cr|In|Pa|PS|RS|Sc)_\d+$")


class DataError(ValueError):
    """The dataset on disk cannot be used as asked; the message names the path and the problem."""


@dataclass
class Sample:
    path: str
    label: int


@dataclass
class DatasetIndex:
    """What `discover` found: classes, samples per split ("all" when the dataset has no split),
    files skipped with the reason, and per-image extra labels (GC10 XML)."""
    root: str
    format: str
    classes: list[str]
    splits: dict[str, list[Sample]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    extra_labels: dict[str, list[str]] = field(default_factory=dict)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))


def _subdirs(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def detect_format(root: str) -> str:
    """The layout of `root` (one of FORMATS other than auto), or DataError."""
    subs = _subdirs(root)
    if any(d.startswith("MT_") for d in subs):
        return "mt"
    digit_dirs = [d for d in subs if d.isdigit()]
    if "lable" in subs or (digit_dirs and len(digit_dirs) == len([d for d in subs if d != "label"])):
        return "gc10"
    stems = [os.path.splitext(f)[0] for f in _files(root) if _is_image(f)]
    if stems and sum(bool(_NEU_RE.match(s)) for s in stems) >= 0.5 * len(stems):
        return "neu"
    if subs:
        return "folders"
    raise DataError(f"no images found under {root}: expected class folders, NEU-CLS files (Cr_1.bmp ...), "
                    f"GC10-DET folders 1..10 or Magnetic-Tile MT_*/Imgs (extensions {', '.join(IMAGE_EXTS)})")


def _scan_folder(folder, label, samples, skipped, exclude=()):
    for f in _files(folder):
        path = os.path.join(folder, f)
        if path in exclude:
            skipped.append((path, "mask"))
        elif _is_image(f):
            samples.append((path, label))
        else:
            skipped.append((path, "not an image"))


def _read_neu(root, skipped):
    found = []
    for f in _files(root):
        path = os.path.join(root, f)
        m = _NEU_RE.match(os.path.splitext(f)[0])
        if not _is_image(f):
            skipped.append((path, "not an image"))
        elif m is None:
            skipped.append((path, "name has no NEU-CLS class prefix (Cr_, In_, Pa_, PS_, RS_, Sc_)"))
        else:
            found.append((path, NEU_PREFIXES[m.group(1)]))
    return found


def _read_folders(root, skipped):
    found = []
    for f in _files(root):
        skipped.append((os.path.join(root, f), "file outside any class folder"))
    for cls in _subdirs(root):
        before = len(found)
        _scan_folder(os.path.join(root, cls), cls, found, skipped)
        for d in _subdirs(os.path.join(root, cls)):
            skipped.append((os.path.join(root, cls, d), "nested folder"))
        if len(found) == before:
            skipped.append((os.path.join(root, cls), "class folder holds no images"))
    return found


def _read_gc10(root, skipped, extra):
    found = []
    xml_dir = next((os.path.join(root, d) for d in ("lable", "label") if os.path.isdir(os.path.join(root, d))), None)
    for d in _subdirs(root):
        if os.path.join(root, d) == xml_dir:
            continue
        name = GC10_CLASSES[int(d) - 1] if d.isdigit() and 1 <= int(d) <= 10 else d
        _scan_folder(os.path.join(root, d), name, found, skipped)
    if xml_dir is not None:
        for f in _files(xml_dir):
            if not f.lower().endswith(".xml"):
                continue
            try:
                tree = ET.parse(os.path.join(xml_dir, f))
            except ET.ParseError as e:
                skipped.append((os.path.join(xml_dir, f), f"unreadable XML ({e})"))
                continue
            names = []
            for obj in tree.getroot().iter("object"):
                raw = (obj.findtext("name") or "").strip()
                num = re.match(r"^(\d+)", raw)
                names.append(GC10_CLASSES[int(num.group(1)) - 1] if num and 1 <= int(num.group(1)) <= 10 else raw)
            extra[os.path.splitext(f)[0]] = sorted(set(names))
    return found


def _read_mt(root, skipped):
    found = []
    for d in _subdirs(root):
        if not d.startswith("MT_"):
            skipped.append((os.path.join(root, d), "not an MT_<Class> folder"))
            continue
        folder = os.path.join(root, d, "Imgs") if os.path.isdir(os.path.join(root, d, "Imgs")) else os.path.join(root, d)
        files = _files(folder)
        jpg_stems = {os.path.splitext(f)[0] for f in files if f.lower().endswith((".jpg", ".jpeg"))}
        masks = {os.path.join(folder, f) for f in files if f.lower().endswith(".png") and os.path.splitext(f)[0] in jpg_stems}
        _scan_folder(folder, d[3:], found, skipped, exclude=masks)
    return found


def _read_split(root, fmt, skipped, extra):
    if fmt == "auto":
        fmt = detect_format(root)
    reader = {"neu": lambda: _read_neu(root, skipped), "folders": lambda: _read_folders(root, skipped),
              "gc10": lambda: _read_gc10(root, skipped, extra), "mt": lambda: _read_mt(root, skipped)}[fmt]
    return fmt, reader()


def discover(root: str, format: str = "auto") -> DatasetIndex:
    """Index the dataset at `root`; raises DataError for a missing/empty folder or a single class."""
    if format not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not os.path.exists(root):
        raise DataError(f"data path {root} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"data path {root} is not a folder")
    skipped, extra, raw = [], {}, {}
    split_dirs = {d: SPLIT_NAMES[d.lower()] for d in _subdirs(root) if d.lower() in SPLIT_NAMES}
    fmt = format
    if "train" in split_dirs.values() and len(set(split_dirs.values())) > 1:
        for d, split in split_dirs.items():
            fmt, raw[split] = _read_split(os.path.join(root, d), format, skipped, extra)
        for f in _files(root):
            skipped.append((os.path.join(root, f), "file outside the split folders"))
    else:
        fmt, raw["all"] = _read_split(root, format, skipped, extra)
    names = sorted({cls for items in raw.values() for _, cls in items})
    if not names:
        raise DataError(f"no images found under {root} (format {fmt}; extensions {', '.join(IMAGE_EXTS)})")
    if len(names) < 2:
        raise DataError(f"{root} holds a single class {names[0]!r}; classification needs at least 2 classes")
    if fmt == "neu":  # keep NEU's canonical class order
        names = [c for c in NEU_PREFIXES.values() if c in names]
    elif fmt == "gc10":
        names = [c for c in GC10_CLASSES if c in names] + [c for c in names if c not in GC10_CLASSES]
    idx = {c: i for i, c in enumerate(names)}
    splits = {s: [Sample(p, idx[c]) for p, c in items] for s, items in raw.items()}
    for s, items in splits.items():
        if not items:
            raise DataError(f"split {s!r} of {root} holds no images")
    return DatasetIndex(os.path.abspath(root), fmt, names, splits, skipped, extra)


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Indices per split, each class divided in the given fractions (the first split gets the rest)."""
    rng = np.random.default_rng(seed)
    out = {name: [] for name in fractions}
    names = list(fractions)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        start = 0
        for name in names[1:]:
            # at least one per class in every held-out split when the class allows it
            k = int(round(fractions[name] * len(idx)))
            k = max(k, 1) if len(idx) - start > 1 else 0
            out[name].append(idx[start:start + k])
            start += k
        out[names[0]].append(idx[start:])
    return {n: np.sort(np.concatenate(v)) for n, v in out.items()}


def make_splits(index: DatasetIndex, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0) -> dict[str, list[Sample]]:
    """train/val/test lists. Missing splits are carved out of train, stratified and seeded:
    no split -> train/val/test; train+test -> val from train; train+val -> the given val is used
    as test (as the authors' release does) and a fresh val is carved from train for model selection."""
    s = dict(index.splits)
    if "all" in s:
        items = s.pop("all")
        parts = stratified_split(np.array([x.label for x in items]),
                                 {"train": 0, "val": val_fraction, "test": test_fraction}, seed)
        return {k: [items[i] for i in v] for k, v in parts.items()}
    if "test" not in s:
        s["test"] = s.pop("val")
    if "val" not in s:
        items = s["train"]
        parts = stratified_split(np.array([x.label for x in items]), {"train": 0, "val": val_fraction}, seed)
        s["train"], s["val"] = [items[i] for i in parts["train"]], [items[i] for i in parts["val"]]
    return {k: s[k] for k in ("train", "val", "test")}
