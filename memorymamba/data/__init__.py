"""Datasets: the embedded synthetic generator, real dataset layouts, audit, splits and loading."""
from .audit import audit, format_audit
from .formats import FORMATS, DataError, DatasetIndex, Sample, detect_format, discover, make_splits, stratified_split
from .images import NORM, ImageReadError, TensorImageDataset, augment, load_split, normalize, open_image
from .prepare import PreparedData, prepare, subsample_train, synthetic_spec
from .synthetic import CLASSES as SYNTHETIC_CLASSES, SyntheticSpec, cache_root, ensure_synthetic, write_tree

__all__ = ["audit", "format_audit", "FORMATS", "DataError", "DatasetIndex", "Sample", "detect_format", "discover",
           "make_splits", "stratified_split", "NORM", "ImageReadError", "TensorImageDataset", "augment",
           "load_split", "normalize", "open_image", "PreparedData", "prepare", "subsample_train",
           "synthetic_spec", "SYNTHETIC_CLASSES", "SyntheticSpec", "cache_root", "ensure_synthetic", "write_tree"]
