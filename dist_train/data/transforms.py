"""Image transforms on uint8 arrays with OpenCV and numpy (no PIL round trips).

Owns: the training augmentation (center crop, random resized crop, resize, horizontal flip,
colour jitter), the evaluation transform, the public low-light transform, and normalisation of
uint8 batches on their device. Does not own: decoding (datasets) or sampling.

Images are ``[H, W, 3]`` uint8 RGB in and out; every random choice comes from the ``rng``
passed in (anything with a ``random()`` method returning floats in [0, 1): a
:class:`SampleRandom` or a ``numpy.random.Generator``), so augmentation is reproducible from
the sample's seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

_MASK64 = (1 << 64) - 1


class SampleRandom:
    """Small, fast random source for one sample's augmentation (splitmix64 in pure Python).

    Creating a ``numpy.random.Generator`` per sample costs more than some transforms; this
    one is seeded from a few integers (e.g. seed, epoch, rank, position) in about a
    microsecond. It provides the ``random()`` method the transforms use (``numpy``
    generators work as well).
    """

    __slots__ = ("_state",)

    def __init__(self, *key: int):
        state = 0x9E3779B97F4A7C15
        for k in key:
            state = self._mix((state ^ (int(k) & _MASK64)) + 0x632BE59BD9B4E019)
        self._state = state

    @staticmethod
    def _mix(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        return z ^ (z >> 31)

    def random(self) -> float:
        """Uniform float in [0, 1) (53 random bits)."""
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        return (self._mix(self._state) >> 11) * (1.0 / (1 << 53))


_LOW_LIGHT_LUT = np.clip(np.sqrt(np.arange(256, dtype=np.float64)) * 2.0, 0, 255).astype(np.uint8)


def low_light(img: np.ndarray) -> np.ndarray:
    """Low-light version of an image: ``x <- uint8(clip(sqrt(x) * 2))`` per channel value.

    Args:
        img: uint8 array of any shape.

    Returns:
        uint8 array of the same shape (values 0..31).
    """
    if img.dtype != np.uint8:
        raise TypeError(f"low_light expects uint8, got {img.dtype}")
    return _LOW_LIGHT_LUT[img]


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Central ``size x size`` window (the image is returned unchanged when smaller)."""
    h, w = img.shape[:2]
    if size <= 0 or (size >= h and size >= w):
        return img
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return img[top : top + size, left : left + size]


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size x size``: area averaging when shrinking, bilinear when growing."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def random_resized_crop(
    img: np.ndarray,
    size: int,
    rng: np.random.Generator,
    area: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Crop of a random area fraction and aspect ratio (log-uniform), resized to ``size``.

    Falls back to the whole image when no crop of the drawn shape fits.
    """
    h, w = img.shape[:2]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = (area[0] + (area[1] - area[0]) * rng.random()) * h * w
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(rng.random() * (h - ch + 1)), h - ch)
            left = min(int(rng.random() * (w - cw + 1)), w - cw)
            return resize(img[top : top + ch, left : left + cw], size)
    return resize(img, size)


def color_jitter(img: np.ndarray, rng, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors each uniform in ``[1 - s, 1 + s]``.

    Applied in that order, each result clipped to uint8 as torchvision does: brightness
    ``b*x``, contrast ``c*x + (1-c)*mean(gray)``, saturation ``s*x + (1-s)*gray`` (RGB input).
    Brightness and contrast fold into one 256-entry lookup table, saturation is one OpenCV
    weighted sum, so the whole jitter costs a few passes over uint8 pixels.
    """
    if strength <= 0:
        return img
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    b = lo + (hi - lo) * rng.random()
    c = lo + (hi - lo) * rng.random()
    s = lo + (hi - lo) * rng.random()
    img = np.ascontiguousarray(img)
    bright = np.minimum(np.arange(256, dtype=np.float32) * b + 0.5, 255.0).astype(np.uint8)
    # the contrast pivot is the mean gray level of the brightened image
    mean = cv2.mean(cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), bright))[0]
    lut = np.clip(bright * np.float32(c) + np.float32((1.0 - c) * mean + 0.5), 0, 255)
    x = cv2.LUT(img, lut.astype(np.uint8))
    g = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(x, s, g, 1.0 - s, 0.0)


class TrainTransform:
    """Training augmentation configured from :class:`dist_train.config.DataConfig` fields.

    Order: center crop, random resized crop (or plain resize), horizontal flip, colour jitter,
    low light. Picklable (DataLoader workers receive a copy).
    """

    def __init__(
        self,
        image_size: int = 112,
        *,
        hflip: bool = True,
        random_resized_crop: bool = False,
        crop_area_min: float = 0.8,
        color_jitter: float = 0.0,
        center_crop: int = 0,
        low_light: bool = False,
    ):
        self.image_size = image_size
        self.hflip = hflip
        self.random_resized_crop = random_resized_crop
        self.crop_area_min = crop_area_min
        self.color_jitter = color_jitter
        self.center_crop = center_crop
        self.low_light = low_light

    @classmethod
    def from_config(cls, cfg) -> TrainTransform:
        return cls(
            cfg.image_size,
            hflip=cfg.hflip,
            random_resized_crop=cfg.random_resized_crop,
            crop_area_min=cfg.crop_area_min,
            color_jitter=cfg.color_jitter,
            center_crop=cfg.center_crop,
            low_light=cfg.low_light,
        )

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB -> ``[image_size, image_size, 3]`` uint8 RGB."""
        if self.center_crop:
            img = center_crop(img, self.center_crop)
        if self.random_resized_crop:
            img = random_resized_crop(img, self.image_size, rng, (self.crop_area_min, 1.0))
        else:
            img = resize(img, self.image_size)
        if self.hflip and rng.random() < 0.5:
            img = cv2.flip(
                np.ascontiguousarray(img), 1
            )  # SIMD copy; a [:, ::-1] view is slower later
        if self.color_jitter > 0:
            img = color_jitter(img, rng, self.color_jitter)
        if self.low_light:
            img = low_light(img)
        return img

    def __repr__(self) -> str:
        return f"TrainTransform({self.__dict__})"


class EvalTransform:
    """Deterministic evaluation transform: center crop, resize, optional low light."""

    def __init__(self, image_size: int = 112, *, center_crop: int = 0, low_light: bool = False):
        self.image_size = image_size
        self.center_crop = center_crop
        self.low_light = low_light

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        if self.center_crop:
            img = center_crop(img, self.center_crop)
        img = resize(img, self.image_size)
        return low_light(img) if self.low_light else img


def normalize(
    images: torch.Tensor, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5
) -> torch.Tensor:
    """``(images / 255 - mean) / std`` as float32 on the images' device.

    Args:
        images: ``[B, 3, H, W]`` uint8 (or any real dtype on the 0..255 scale).
        mean: per-channel means on the [0, 1] scale (a float applies to every channel).
        std: per-channel standard deviations on the [0, 1] scale.

    Returns:
        ``[B, 3, H, W]`` float32.
    """
    import torch  # here, so the image tools can use this module without torch

    x = images.float()
    dev = images.device
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev)
    if m.ndim == 1:
        m = m.view(1, -1, 1, 1)
    if s.ndim == 1:
        s = s.view(1, -1, 1, 1)
    # fold /255 into the affine map: one fused multiply-add over the batch
    return (x - m * 255.0) / (s * 255.0)
