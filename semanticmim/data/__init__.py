"""The data layer: decoding, on-disk layouts and torch Datasets, transforms, loaders, shards, the embedded
dataset, inspection and manifests.

Public names of the submodules are re-exported here lazily (PEP 562): `import semanticmim.data` imports
nothing heavy, and a name's submodule (torch, torchvision, timm...) is imported on first use.
"""

import importlib
from typing import Any

_EXPORTS = {
    "decode": ("EncodedImage", "UnreadableImage", "load_rgb"),
    "layouts": (
        "ADE20K_CLASSES", "IGNORE_INDEX", "IMAGE_EXTENSIONS", "LAYOUTS", "VOC_CLASSES", "ClassificationDataset",
        "ClassificationSplit", "LabelMap", "SegmentationDataset", "SegmentationSplit", "SkipLog",
        "available_splits", "image_to_tensor", "read_ade20k", "read_imagefolder", "read_imagenet", "read_label",
        "read_pairs", "read_split", "read_voc", "voc_palette", "write_class_index",
    ),
    "embedded": (
        "CLASSIFICATION_DIR", "GENERATOR_VERSION", "OBJECT_CLASSES", "SEGMENTATION_CLASSES", "SEGMENTATION_DIR",
        "STUFF_CLASSES", "EmbeddedScene", "generate_arrays", "generate_embedded", "generate_scene", "iter_scenes",
    ),
    "inspect": ("DatasetReport", "dataset_fingerprint", "inspect_dataset", "write_manifest"),
    "transforms": (
        "IMAGENET_MEAN", "IMAGENET_STD", "AdeTrain", "BeitTwoView", "ClassifierEval", "CropBox",
        "CropFlip", "FinetuneTrain", "MocoTwoView", "PhotoMetricDistortion", "SegmentationEval",
        "VocLinearTrain", "build_mixup", "decode_for_crops", "decode_tensor_for_crops", "linear_probe_transform",
        "maskfeat_transform", "normalize", "resized_crop", "sample_crop_box", "unit_range",
    ),
    "loader": ("RowIndices", "build_loader", "sample_seed", "seed_everything", "seeded_rngs", "set_epoch"),
    "shards": ("INDEX_NAME", "ShardDataset", "write_shards"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
