"""The options of one evaluation, declared once.

Owns :class:`EvalOptions`: how images are prepared (the training evaluation transform's size,
crop and low light), normalised and embedded (batch, flip TTA, autocast), and the folds of the
accuracy protocol. :mod:`eval.runner`, :mod:`eval.extract` and :mod:`eval.targets` take it;
``eval.cli`` builds it from arguments and the trainer from its config
(:meth:`EvalOptions.from_train_config`). It does not own which targets are evaluated nor the
model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dist_train.data.transforms import EvalTransform
from dist_train.precision import amp_dtype


@dataclass(frozen=True)
class EvalOptions:
    """How a backbone is evaluated on verification targets."""

    batch_size: int = 128
    """Images per forward pass (per view)."""
    flip: bool = True
    """Flip test-time augmentation: add the embedding of the mirrored image."""
    low_light: bool = False
    """Apply the low-light transform (``dist_train.data.transforms.low_light``) to the images."""
    mean: float = 0.5
    """Input normalisation mean on [0, 1] pixels (the training ``data.mean``)."""
    std: float = 0.5
    """Input normalisation std on [0, 1] pixels (the training ``data.std``)."""
    amp: str = "none"
    """Autocast of the forward passes: ``"none"``, ``"bf16"`` or ``"fp16"``."""
    image_size: int | None = None
    """Resize images to this side when they differ (None: keep them as stored)."""
    center_crop: int = 0
    """Central square taken before resizing (the training ``data.center_crop``; 0: off)."""
    n_folds: int = 10
    """Folds of the accuracy protocol."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        amp_dtype(self.amp)  # raises ValueError naming the valid names

    @classmethod
    def from_train_config(cls, cfg: Any) -> EvalOptions:
        """The options the trainer evaluates with: its ``eval`` section (batch, flip, low light),
        the input it trained on (``data.mean/std/image_size/center_crop``) and its ``amp``.

        Args:
            cfg: a ``dist_train.config.TrainConfig`` (read by attribute).
        """
        return cls(
            batch_size=cfg.eval.batch_size,
            flip=cfg.eval.flip,
            low_light=cfg.eval.low_light,
            mean=cfg.data.mean,
            std=cfg.data.std,
            amp=cfg.amp,
            image_size=cfg.data.image_size,
            center_crop=cfg.data.center_crop,
        )

    @classmethod
    def with_overrides(cls, options: EvalOptions | None = None, **fields: Any) -> EvalOptions:
        """``options`` (default: the defaults) with the named fields replaced.

        Raises:
            TypeError: a name that is not a field of :class:`EvalOptions`.
        """
        return dataclasses.replace(options or cls(), **fields)

    def transform(self) -> EvalTransform:
        """The training evaluation transform (center crop, resize, low light) these options
        prepare images with."""
        return EvalTransform(
            self.image_size, center_crop=self.center_crop, low_light=self.low_light
        )
