"""`memorymamba data audit`: what a dataset folder really holds before anyone trains on it."""
from __future__ import annotations

import os
from collections import defaultdict

from .formats import discover
from .images import ImageReadError, open_image, pixel_hash


def audit(root: str, format: str = "auto") -> dict:
    """Report on the dataset at `root`.

    Keys: root, format, classes, counts {split: {class: n}}, imbalance_ratio {split: max/min},
    unreadable [(path, reason)], modes {split: {PIL mode: n}}, sizes (distinct (w, h), up to 10),
    duplicates_within [{split, paths}], duplicates_across [{splits, paths}] (same decoded pixels),
    skipped [(path, reason)] (masks, non-images, ...), multi_label (GC10: images whose XML names
    classes besides their folder's) and n_images."""
    index = discover(root, format)
    counts, modes, unreadable = {}, {}, []
    by_hash = defaultdict(list)
    sizes = set()
    for split, samples in index.splits.items():
        counts[split] = {c: 0 for c in index.classes}
        modes[split] = {}
        for s in samples:
            try:
                im = open_image(s.path)
            except ImageReadError as e:
                unreadable.append((s.path, str(e).split(": ", 1)[-1]))
                continue
            counts[split][index.classes[s.label]] += 1
            modes[split][im.mode] = modes[split].get(im.mode, 0) + 1
            sizes.add(im.size)
            by_hash[pixel_hash(im)].append((split, s.path))
    within, across = [], []
    for group in by_hash.values():
        if len(group) < 2:
            continue
        splits = sorted({sp for sp, _ in group})
        entry = {"paths": [p for _, p in group]}
        if len(splits) > 1:
            across.append({"splits": splits, **entry})
        else:
            within.append({"split": splits[0], **entry})
    imbalance = {}
    for split, c in counts.items():
        nz = [v for v in c.values()]
        imbalance[split] = (max(nz) / min(nz)) if nz and min(nz) > 0 else float("inf")
    multi = []
    for s in (x for v in index.splits.values() for x in v):
        extra = index.extra_labels.get(os.path.splitext(os.path.basename(s.path))[0])
        if extra and any(name != index.classes[s.label] for name in extra):
            multi.append({"path": s.path, "folder_class": index.classes[s.label], "xml_classes": extra})
    return {"root": index.root, "format": index.format, "classes": index.classes, "counts": counts,
            "imbalance_ratio": imbalance, "n_images": sum(sum(c.values()) for c in counts.values()),
            "unreadable": unreadable, "modes": modes, "sizes": sorted(sizes)[:10],
            "duplicates_within": within, "duplicates_across": across,
            "skipped": index.skipped, "multi_label": multi}


def format_audit(report: dict, limit: int = 10) -> str:
    """Human-readable text of an `audit` report (lists cut to `limit` entries)."""
    lines = [f"dataset {report['root']}  (format {report['format']}, {report['n_images']} readable images)"]
    splits = list(report["counts"])
    width = max(len(c) for c in report["classes"]) + 2
    lines.append("class".ljust(width) + "".join(s.rjust(8) for s in splits))
    for c in report["classes"]:
        lines.append(c.ljust(width) + "".join(str(report["counts"][s][c]).rjust(8) for s in splits))
    lines.append("imbalance".ljust(width) + "".join(f"{report['imbalance_ratio'][s]:8.2f}" for s in splits))
    lines.append("modes: " + "; ".join(f"{s}: {m}" for s, m in report["modes"].items()))

    def block(title, items, fmt):
        lines.append(f"{title}: {len(items)}")
        lines.extend("  " + fmt(x) for x in items[:limit])
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more")

    block("unreadable files", report["unreadable"], lambda x: f"{x[0]}: {x[1]}")
    block("duplicates within a split", report["duplicates_within"], lambda x: f"[{x['split']}] " + ", ".join(x["paths"]))
    block("duplicates across splits", report["duplicates_across"], lambda x: f"[{'/'.join(x['splits'])}] " + ", ".join(x["paths"]))
    block("files skipped", report["skipped"], lambda x: f"{x[0]}: {x[1]}")
    if report["format"] == "gc10":
        block("multi-label images (label taken from the folder)", report["multi_label"],
              lambda x: f"{x['path']}: folder {x['folder_class']}, XML {x['xml_classes']}")
    return "\n".join(lines)
