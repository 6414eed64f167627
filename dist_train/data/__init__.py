"""Data: RecordIO, datasets, samplers, transforms and synthetic data.

Public entry points (see ``docs/data.md``):

* :func:`build_train_data` ``(cfg: DataConfig, dist: DistInfo, seed) -> TrainData`` with
  ``.loader`` (uint8 ``[B, 3, H, W]`` images, int64 ``[B]`` labels), ``.sampler``,
  ``.num_classes``, ``.num_images``;
* :func:`normalize` ``(images_uint8, mean, std)`` -> float32 on the images' device;
* :mod:`.recordio` (MXNet RecordIO without mxnet), :mod:`.samplers`, :mod:`.transforms`
  (including the public :func:`~.transforms.low_light`), :mod:`.synthetic`, :mod:`.packing`.

Names are imported on first use, so tools that only need RecordIO or the synthetic generator
(``launch/make_synthetic.py``) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "datasets": [
        "DataError",
        "RecordDataset",
        "decode_image",
        "folder_dataset",
        "list_dataset",
        "open_train_dataset",
    ],
    "loader": ["TrainData", "build_train_data"],
    "recordio": [
        "IRHeader",
        "RecordIOError",
        "RecordIOReader",
        "RecordIOWriter",
        "pack",
        "unpack",
    ],
    "transforms": ["EvalTransform", "TrainTransform", "low_light", "normalize"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
