"""Data: RecordIO, datasets, samplers, transforms and synthetic data.

Public entry points (see ``docs/data.md``):

* :func:`build_train_data` ``(cfg: DataConfig, dist: DistInfo, seed) -> TrainData`` with
  ``.loader`` (uint8 ``[B, 3, H, W]`` images, int64 ``[B]`` labels), ``.sampler``,
  ``.num_classes``, ``.num_images``;
* :func:`normalize` ``(images_uint8, mean, std)`` -> float32 on the images' device;
* :mod:`.recordio` (MXNet RecordIO without mxnet), :mod:`.samplers`, :mod:`.transforms`
  (including the public :func:`~.transforms.low_light`), :mod:`.synthetic`.
"""

from .datasets import (
    DataError,
    RecordDataset,
    TrainData,
    build_train_data,
    decode_image,
    folder_dataset,
    list_dataset,
    open_train_dataset,
    read_bin,
    read_pair_list,
)
from .recordio import IRHeader, RecordIOError, RecordIOReader, RecordIOWriter, pack, unpack
from .transforms import EvalTransform, TrainTransform, low_light, normalize

__all__ = [
    "DataError",
    "EvalTransform",
    "IRHeader",
    "RecordDataset",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "TrainData",
    "TrainTransform",
    "build_train_data",
    "decode_image",
    "folder_dataset",
    "list_dataset",
    "low_light",
    "normalize",
    "open_train_dataset",
    "pack",
    "read_bin",
    "read_pair_list",
    "unpack",
]
