"""Training configuration: defaults per recipe, a YAML/JSON file, then command-line overrides.

Precedence: recipe defaults < config file < command line. The recipe is chosen by the data:

* ``paper`` (any dataset on disk): the paper's fine-tuning recipe (sec. 5.2) -- AdamW, lr 2e-5,
  weight decay 0.01, 10 epochs, 5% linear warm-up then linear decay, batch 64, 224x224 inputs,
  L = L_cls + 0.1 L_contrastive + 0.1 L_NCE. It assumes ImageNet-pretrained VMamba weights
  (--pretrained).
* ``synthetic`` (``data: synthetic``, the default): training memorymamba_nano *from scratch* on
  the embedded synthetic dataset in a few CPU minutes needs a from-scratch recipe instead: 64x64
  grayscale inputs, lr 1e-3, weight decay 0.05, the same warm-up/decay shape, batch 32, 10 epochs
  over 1000 train images per class, and torch threads = the idle cores (``threads: 0``).
  What set it (2-core CPU dev box, 10-epoch controlled runs on the 300-per-class split unless
  said): without augmentation nano reaches 100% train and 58% test accuracy, so the data, not
  the model's fit, limits it: 6 epochs over 1000 per class reached 90.0%, 10 epochs over 300 per
  class 83.8% (and 20 epochs, BN in the stem only, 84.8%). With BN in the stem only (the
  downsamples ln2d): lr 1e-3 beat 2e-3, 5e-4 and 2.5e-4 (76.8% vs 58.8%, 69.7%, 59.0%); no gradient
  clipping, no drop-path, batch 16 or dims 48 did not help.
  With 8 epochs it took 215 s (93.2% test); once the CPU scan kernels ran 2x faster, 8 epochs took
  149 s (93.7%, data cached), 11 epochs 199 s (94.8%) and dims 48 for 10 epochs 293 s (94.7%): more
  epochs were the cheaper gain, and 10 leave room for a box running 1.5x slower. At 10 epochs lr 2e-3
  gave 93.5%; batch 64 with lr 2e-3 ran 25% faster but reached 94.2% (10 epochs, 151 s) and 94.3%
  (13 epochs, 192 s).
  Measured with 10 epochs (fresh cache, so drawing the data included): 205 s wall, 2 threads, 94.8%
  test accuracy.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

import yaml


@dataclass
class TrainConfig:
    # model
    model: str = "memorymamba_nano"          # memorymamba_{nano,tiny,small,base} | resnet18 | resnet50
    model_args: dict = field(default_factory=dict)  # create_model overrides (depths, dims, ablation switches ...)
    pretrained: str | None = None            # VMamba checkpoint (memorymamba) or torchvision weights file (resnet)
    # data
    data: str = "synthetic"                  # "synthetic" or a dataset folder
    format: str = "auto"                     # auto | neu | folders | gc10 | mt
    image_size: int = 224
    channels: int = 1                        # 1 (grayscale) or 3; --pretrained models want 3
    val_fraction: float = 0.15               # used when the dataset has no val split
    test_fraction: float = 0.15              # used when the dataset has no test split
    split_seed: int = 0
    imbalance: float = 1.0                   # subsample train so largest/smallest class = this ratio
    few_shot: int = 0                        # keep K train images per class (0: all)
    synthetic_train_per_class: int = 1000
    synthetic_val_per_class: int = 60
    synthetic_test_per_class: int = 100
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0                   # max gradient norm; 0 disables
    lambda_c: float = 0.1
    lambda_f: float = 0.1
    temperature: float = 0.5
    label_smoothing: float = 0.0
    balance: str = "auto"                    # auto | none | weight | sampler
    augment: bool = True                     # random flips and 90-degree turns
    amp: str = "auto"                        # auto (bf16/fp16 on GPU, off on CPU) | off | bf16 | fp16
    # run
    device: str = "auto"                     # auto | cpu | cuda
    seed: int = 0
    threads: int = 0                         # torch CPU threads (0: torch's default less the busy cores)
    output: str = "runs"
    name: str = ""                           # run folder name (default: <model>-<data>-<time>)
    progress: bool = True
    recipe: str = ""                         # filled in: "paper" or "synthetic"


PAPER = {}  # the dataclass defaults are the paper's recipe
SYNTHETIC = {"image_size": 64, "channels": 1, "lr": 1e-3, "weight_decay": 0.05, "epochs": 10, "batch_size": 32}
RECIPES = {"paper": PAPER, "synthetic": SYNTHETIC}

_FIELDS = {f.name: f for f in fields(TrainConfig)}


class ConfigError(ValueError):
    """A bad config file or value; the message names the key or file."""


def load_file(path: str) -> dict:
    """A config file (.yaml/.yml/.json) as a flat dict; a `train:` section is accepted too."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.lower().endswith('.json') else 'YAML'}: {' '.join(str(e).split())}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return data


def parse_assignment(text: str) -> tuple[str, object]:
    """'key=value' (value parsed as YAML: numbers, lists, true/false) -> (key, value)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {value!r}: {e}") from None


def _check(key, value, source):
    if key not in _FIELDS:
        raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(_FIELDS))}")
    typ = _FIELDS[key].type
    if value is None:
        return value
    want = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}.get(typ.split(" |")[0])
    if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: {key} must be {typ}, got {value!r}")
    return float(value) if typ == "float" else value


def resolve(file_values: dict | None = None, overrides: dict | None = None, file_name: str = "config file") -> TrainConfig:
    """Recipe defaults < file values < overrides (None-valued overrides are ignored)."""
    merged = {}
    for source, values in ((file_name, file_values or {}), ("command line", overrides or {})):
        for k, v in values.items():
            if k.startswith("model_args."):
                merged.setdefault("model_args", {})
                merged["model_args"] = {**merged["model_args"], k.split(".", 1)[1]: v}
            elif v is not None:
                v = _check(k, v, source)
                merged[k] = {**merged.get(k, {}), **v} if k == "model_args" else v
    recipe = "synthetic" if merged.get("data", "synthetic") == "synthetic" else "paper"
    cfg = TrainConfig(**{**RECIPES[recipe], **merged})
    cfg.recipe = recipe
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    rules = [
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.image_size >= 8, f"image_size must be >= 8, got {cfg.image_size}"),
        (cfg.channels in (1, 3), f"channels must be 1 or 3, got {cfg.channels}"),
        (0 <= cfg.warmup_fraction < 1, f"warmup_fraction must lie in [0, 1), got {cfg.warmup_fraction}"),
        (cfg.imbalance >= 1, f"imbalance must be >= 1 (largest/smallest class), got {cfg.imbalance}"),
        (cfg.few_shot >= 0, f"few_shot must be >= 0, got {cfg.few_shot}"),
        (cfg.balance in ("auto", "none", "weight", "sampler"), f"balance must be auto|none|weight|sampler, got {cfg.balance!r}"),
        (cfg.amp in ("auto", "off", "bf16", "fp16"), f"amp must be auto|off|bf16|fp16, got {cfg.amp!r}"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {cfg.device!r}"),
        (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1 and cfg.val_fraction + cfg.test_fraction < 1,
         f"val_fraction + test_fraction must be < 1, got {cfg.val_fraction} + {cfg.test_fraction}"),
    ]
    for ok, msg in rules:
        if not ok:
            raise ConfigError(msg)


def to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def dump_yaml(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
