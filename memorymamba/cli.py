"""The `memorymamba` command (also `python -m memorymamba`): train, eval, predict, data, info.

Bad input ends with one line "error: ..." on stderr and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .config import TrainConfig

EXAMPLES = """examples:
  memorymamba train                                  # synthetic NEU-like data, memorymamba_nano, CPU, ~5 min
  memorymamba train --model resnet18                 # the same split and budget with a ResNet-18 baseline
  memorymamba train --data ~/NEU-CLS --pretrained vssm_tiny.pth --model memorymamba_tiny --channels 3
  memorymamba train --config run.yaml --lr 1e-4      # file values, command line wins
  memorymamba train --resume runs/<name>             # continue an interrupted run
  torchrun --nproc_per_node 4 -m memorymamba train --data ~/GC10-DET
  memorymamba eval runs/<name>/best.pt
  memorymamba predict runs/<name>/best.pt 'images/*.png' -o predictions.csv
  memorymamba data audit ~/Magnetic-Tile
"""


def _add_train(sub):
    p = sub.add_parser("train", help="train a model (no arguments: the embedded synthetic default)",
                       description="Train MemoryMamba or a baseline. With no arguments: generate the synthetic "
                                   "six-class dataset (cached) and train memorymamba_nano on the CPU. Defaults come "
                                   "from the recipe (synthetic, or the paper's for data on disk), then --config, "
                                   "then these flags.", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXAMPLES)
    p.add_argument("--config", help="YAML or JSON file of TrainConfig keys")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (or its last.pt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (repeatable)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="memorymamba_{nano,tiny,small,base} | resnet18 | resnet50")
    g.add_argument("--pretrained", help="VMamba checkpoint (memorymamba) or torchvision weights file (resnet)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="create_model override, e.g. depths=[1,1,1,1] (repeatable)")
    g.add_argument("--no-coarse-memory", action="store_true", help="ablation: drop the coarse memory network")
    g.add_argument("--no-fine-memory", action="store_true", help="ablation: drop the fine memory network")
    g.add_argument("--no-fusion", action="store_true", help="ablation: drop the fusion module")
    g.add_argument("--coarse-memory-size", type=int)
    g.add_argument("--fine-memory-size", type=int)
    g.add_argument("--similarity", choices=["cosine", "l1", "l2"])
    g.add_argument("--drop-path", type=float, dest="drop_path_rate")
    g = p.add_argument_group("data")
    g.add_argument("--data", help='dataset folder, or "synthetic" (default)')
    g.add_argument("--format", choices=["auto", "neu", "folders", "gc10", "mt"])
    g.add_argument("--image-size", type=int)
    g.add_argument("--channels", type=int, choices=[1, 3])
    g.add_argument("--imbalance", type=float, help="subsample train to this largest/smallest class ratio")
    g.add_argument("--few-shot", type=int, metavar="K", help="keep K train images per class")
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--test-fraction", type=float)
    g.add_argument("--split-seed", type=int)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-fraction", type=float)
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--lambda-c", type=float)
    g.add_argument("--lambda-f", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--balance", choices=["auto", "none", "weight", "sampler"])
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    g.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"])
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=int)
    g.add_argument("--output", help="folder of run folders (default runs)")
    g.add_argument("--name", help="run folder name")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p


_ABLATION = {"no_coarse_memory": ("use_coarse_memory", False), "no_fine_memory": ("use_fine_memory", False),
             "no_fusion": ("use_fusion", False)}
_MODEL_ARGS = ("coarse_memory_size", "fine_memory_size", "similarity", "drop_path_rate")


def _train_overrides(args) -> dict:
    from .config import parse_assignment
    keys = set(TrainConfig.__dataclass_fields__) - {"model_args", "recipe"}
    out = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    model_args = {}
    for flag, (key, value) in _ABLATION.items():
        if getattr(args, flag):
            model_args[key] = value
    for key in _MODEL_ARGS:
        if getattr(args, key) is not None:
            model_args[key] = getattr(args, key)
    for text in args.model_arg:
        k, v = parse_assignment(text)
        model_args[k] = v
    for text in args.set:
        k, v = parse_assignment(text)
        out[k] = v
    if model_args:
        out["model_args"] = {**out.get("model_args", {}), **model_args}
    return out


def cmd_train(args):
    from .config import load_file, resolve
    from .train import train
    if args.resume:
        given = [k for k, v in _train_overrides(args).items() if v not in (None, {}, [])]
        if given or args.config:
            raise SystemExit2(f"--resume continues a run with its saved config; drop {', '.join(given) or '--config'}")
        train(resume=args.resume)
        return
    cfg = resolve(load_file(args.config) if args.config else None, _train_overrides(args), args.config or "config file")
    train(cfg)


def cmd_eval(args):
    from .evaluate import evaluate_checkpoint
    evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, format=args.format, output=args.output,
                        device=args.device, batch_size=args.batch_size)


def cmd_predict(args):
    from .predict import predict
    rows = predict(args.checkpoint, args.source, output=args.output, top_k=args.top_k, device=args.device)
    if args.output:
        print(f"{len(rows)} predictions -> {args.output}", file=sys.stderr)


def cmd_data(args):
    if args.data_cmd == "audit":
        from .data import audit, format_audit
        report = audit(args.path, args.format)
        print(json.dumps(report, indent=2) if args.json else format_audit(report, limit=args.limit))
    else:
        from .data import SyntheticSpec, write_tree
        spec = SyntheticSpec(args.train_per_class, args.val_per_class, args.test_per_class, args.image_size, args.seed)
        root = write_tree(spec, args.output)
        print(f"wrote synthetic dataset ({spec.train_per_class}/{spec.val_per_class}/{spec.test_per_class} per class, "
              f"{spec.image_size}x{spec.image_size}, seed {spec.seed}) -> {root}")


def cmd_info(args):
    try:
        from ._info import info
    except ImportError:
        from . import _backend
        import torch
        print(f"memorymamba (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
        avail = getattr(_backend, "available_backends", None)
        print("backends:", avail() if avail else {b: _backend.unavailable_reason(b) or "available" for b in _backend.BACKENDS})
        return
    print(info())


class SystemExit2(Exception):
    """A usage error found after parsing; printed as "error: ..." with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memorymamba", description="MemoryMamba defect recognition: train, evaluate, "
                                "predict, manage datasets.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", metavar="{train,eval,predict,data,info}")
    _add_train(sub).set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint: metrics, per-class table, confusion PNG, report.json",
                       description="Accuracy (micro), macro and weighted precision/recall/F1, per-class table and "
                                   "confusion matrix of a run checkpoint on a split of its data (or of --data).")
    e.add_argument("checkpoint", help="run folder or .pt file (best.pt / last.pt)")
    e.add_argument("--data", help="dataset folder (default: the one the run trained on)")
    e.add_argument("--format", choices=["auto", "neu", "folders", "gc10", "mt"])
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--output", help="report folder (default <run>/eval-<split>)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--batch-size", type=int)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("predict", help="classify an image, a folder or a glob; CSV of class, probability, top-k",
                       description="Writes CSV rows path,class,probability,top_k (top_k = class:prob;...).")
    r.add_argument("checkpoint", help="run folder or .pt file")
    r.add_argument("source", help="image file, folder (recursive) or glob pattern (quote it)")
    r.add_argument("-o", "--output", help="CSV file (default: stdout)")
    r.add_argument("--top-k", type=int, default=3)
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.set_defaults(func=cmd_predict)

    dp = sub.add_parser("data", help="generate the synthetic dataset or audit a dataset folder",
                        description="Dataset tools: generate | audit.")
    dsub = dp.add_subparsers(dest="data_cmd", metavar="{generate,audit}", required=True)
    a = dsub.add_parser("audit", help="per-class counts, imbalance, unreadable files, duplicates, skipped files",
                        description="Audit a dataset folder: per-class counts per split, imbalance ratio, unreadable "
                                    "files, duplicate images within and across splits (hash of decoded pixels), "
                                    "files skipped (masks, non-images), GC10 multi-label images.")
    a.add_argument("path")
    a.add_argument("--format", default="auto", choices=["auto", "neu", "folders", "gc10", "mt"])
    a.add_argument("--json", action="store_true", help="print the full report as JSON")
    a.add_argument("--limit", type=int, default=10, help="entries shown per list")
    g = dsub.add_parser("generate", help="write the synthetic dataset as train/val/test/<class>/*.png",
                        description="Write the synthetic six-class surface-defect dataset as PNG class folders.")
    g.add_argument("output", help="folder to create (replaced if it exists)")
    from .data import SyntheticSpec
    spec = SyntheticSpec()  # the defaults of the dataset `memorymamba train` generates
    g.add_argument("--seed", type=int, default=spec.seed)
    g.add_argument("--image-size", type=int, default=spec.image_size)
    g.add_argument("--train-per-class", type=int, default=spec.train_per_class)
    g.add_argument("--val-per-class", type=int, default=spec.val_per_class)
    g.add_argument("--test-per-class", type=int, default=spec.test_per_class)
    dp.set_defaults(func=cmd_data)

    i = sub.add_parser("info", help="versions, backends, compiled kernels", description="Versions and backends.")
    i.set_defaults(func=cmd_info)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .train import RunError
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warnings.showwarning = _show_warning
    try:
        args.func(args)
    except (ConfigError, DataError, RunError, SystemExit2) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; an interrupted training run continues with `memorymamba train --resume <run folder>`",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
