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
        return self._unit(self._state)

    @classmethod
    def _unit(cls, state: int) -> float:
        """The draw at a stream position: 53 bits of the mixed state, scaled to [0, 1)."""
        return (cls._mix(state) >> 11) * (1.0 / (1 << 53))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix_np(z: np.ndarray) -> np.ndarray:
    """:meth:`SampleRandom._mix` on a uint64 array (numpy's uint64 products wrap mod 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class PresetRandom:
    """One sample's :class:`SampleRandom` stream with its first draws computed in advance.

    ``random()`` returns exactly what ``SampleRandom(*key).random()`` would, call after call:
    the precomputed values first, then the same splitmix64 sequence continued in Python.
    """

    __slots__ = ("_draws", "_next", "_state")

    def __init__(self, draws: list[float], state: int):
        self._draws, self._next, self._state = draws, 0, state

    def random(self) -> float:
        k = self._next
        self._next = k + 1
        if k < len(self._draws):
            return self._draws[k]
        return SampleRandom._unit((self._state + (k + 1) * 0x9E3779B97F4A7C15) & _MASK64)


def preset_randoms(keys: np.ndarray, draws: int) -> list[PresetRandom]:
    """:class:`PresetRandom` for each row of ``keys``, its first ``draws`` values vectorised.

    Args:
        keys: ``[B, K]`` integers; row ``b`` is the key of ``SampleRandom(*keys[b])``
            (values are taken modulo 2**64, as ``SampleRandom`` does).
        draws: how many values to compute per row up front (later calls stay exact).

    Returns:
        ``B`` random sources, each equal in output to ``SampleRandom(*keys[b])``.
    """
    values, state = preset_draws(keys, draws)
    return [PresetRandom(row, s) for row, s in zip(values.tolist(), state.tolist(), strict=True)]


def preset_draws(keys: np.ndarray, draws: int) -> tuple[np.ndarray, np.ndarray]:
    """First ``draws`` values of ``SampleRandom(*row)`` for every row of ``keys``, vectorised.

    Returns:
        ``(values [B, draws] float64, seeded states [B] uint64)``.
    """
    keys = np.asarray(keys)
    if keys.ndim != 2:
        raise ValueError(f"keys must be [B, K], got shape {keys.shape}")
    if keys.dtype != np.uint64:
        keys = keys.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        state = np.full(len(keys), 0x9E3779B97F4A7C15, dtype=np.uint64)
        for col in keys.T:
            # SampleRandom adds before masking: z = (state ^ key) + C may carry into bit 64,
            # and that bit reaches the low 64 bits through the first ``z >> 30``.
            low = state ^ col
            z = low + np.uint64(0x632BE59BD9B4E019)
            carry = (z < low).astype(np.uint64) << np.uint64(34)
            z = (z ^ ((z >> np.uint64(30)) | carry)) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            state = z ^ (z >> np.uint64(31))
        steps = np.arange(1, draws + 1, dtype=np.uint64) * _GOLDEN
        values = (_mix_np(state[:, None] + steps[None, :]) >> np.uint64(11)) * (1.0 / (1 << 53))
    return values, state


_LOW_LIGHT_LUT = np.clip(np.sqrt(np.arange(256, dtype=np.float64)) * 2.0, 0, 255).astype(np.uint8)


def low_light(img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Low-light version of an image: ``x <- uint8(clip(sqrt(x) * 2))`` per channel value.

    Args:
        img: uint8 array of any shape.
        out: optional uint8 array of ``img``'s shape to write into (and return).

    Returns:
        uint8 array of the same shape (values 0..31).
    """
    if img.dtype != np.uint8:
        raise TypeError(f"low_light expects uint8, got {img.dtype}")
    return np.take(_LOW_LIGHT_LUT, img, out=out)


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


CROP_ATTEMPTS = 10  # random resized crop: shapes drawn before falling back to the whole image


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
    for _ in range(CROP_ATTEMPTS):
        target = (area[0] + (area[1] - area[0]) * rng.random()) * h * w
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(rng.random() * (h - ch + 1)), h - ch)
            left = min(int(rng.random() * (w - cw + 1)), w - cw)
            return resize(img[top : top + ch, left : left + cw], size)
    return resize(img, size)


# ITU-R BT.601 luma weights (OpenCV's RGB2GRAY, torchvision's rgb_to_grayscale)
_GRAY = (0.299, 0.587, 0.114)


def jitter_matrix(b: float, c: float, s: float, mean_rgb: Sequence[float]) -> np.ndarray:
    """The ``3 x 4`` affine colour map of brightness ``b``, contrast ``c``, saturation ``s``.

    With ``gray(v) = 0.299 r + 0.587 g + 0.114 b`` and ``m = gray(mean colour of the image)``:
    brightness ``y = b x``; contrast ``z = c y + (1 - c) b m`` (the pivot is the mean gray of
    the brightened image); saturation ``s z + (1 - s) gray(z)`` per pixel. All three are affine
    in the pixel, so their composition is one matrix ``[A | t]`` applied as ``A x + t``.
    """
    w0, w1, w2 = _GRAY
    k, d = c * b * (1.0 - s), c * b * s  # c*b*(s*I + (1-s) * 1 w^T) = d*I + k * 1 w^T
    a0, a1, a2 = k * w0, k * w1, k * w2
    t = (1.0 - c) * b * (w0 * mean_rgb[0] + w1 * mean_rgb[1] + w2 * mean_rgb[2])
    return np.array(
        [[a0 + d, a1, a2, t], [a0, a1 + d, a2, t], [a0, a1, a2 + d, t]], np.float32
    )  # the saturation map keeps gray pixels gray: each row sums to c*b


def color_jitter(img: np.ndarray, rng, strength: float, out: np.ndarray | None = None):
    """Brightness, contrast and saturation factors each uniform in ``[1 - s, 1 + s]``.

    Drawn in that order and applied as one affine colour map (:func:`jitter_matrix`) with one
    rounding and clip to uint8 at the end: one OpenCV pass over the pixels plus a mean.
    (torchvision clips after each of the three steps; the results are the same wherever no
    intermediate value leaves [0, 255], and differ only in how saturated colours clip.)

    Args:
        img: ``[H, W, 3]`` uint8 RGB.
        rng: the sample's random source.
        strength: ``s``; 0 returns ``img`` unchanged.
        out: optional uint8 array of ``img``'s shape to write into (and return).
    """
    if strength <= 0:
        if out is not None:
            out[...] = img
            return out
        return img
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    b = lo + (hi - lo) * rng.random()
    c = lo + (hi - lo) * rng.random()
    s = lo + (hi - lo) * rng.random()
    mean = cv2.mean(img)[:3]
    return cv2.transform(img, jitter_matrix(b, c, s, mean), dst=out)


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

    @property
    def flip_only(self) -> bool:
        """True when the augmentation is at most a resize and a horizontal flip."""
        return not (
            self.center_crop or self.random_resized_crop or self.color_jitter > 0 or self.low_light
        )

    @property
    def max_draws(self) -> int:
        """Random draws per sample at most: a random resized crop takes 2 per attempt (up to
        :data:`CROP_ATTEMPTS`) and 2 for the position of the one that fits."""
        crop = 2 * CROP_ATTEMPTS + 2 if self.random_resized_crop else 0
        return int(self.hflip) + crop + 3 * (self.color_jitter > 0)

    def __call__(
        self, img: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None
    ) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB -> ``[image_size, image_size, 3]`` uint8 RGB.

        Args:
            img: the decoded image.
            rng: the sample's random source (``random()`` in [0, 1)).
            out: optional ``[image_size, image_size, 3]`` uint8 array (e.g. a row of a batch)
                to write the result into; it is returned.
        """
        if self.center_crop:
            img = center_crop(img, self.center_crop)
        if self.random_resized_crop:
            img = random_resized_crop(img, self.image_size, rng, (self.crop_area_min, 1.0))
        else:
            img = resize(img, self.image_size)
        flip = self.hflip and rng.random() < 0.5
        # The colour steps act on each pixel alone, so they commute with the flip: the flip
        # (a copy) goes last and writes the result; each step before it writes a small scratch
        # array that stays in the CPU cache.
        last_out = out if not flip else None
        if self.color_jitter > 0:
            dst = last_out if not self.low_light else None
            img = color_jitter(np.ascontiguousarray(img), rng, self.color_jitter, out=dst)
        if self.low_light:
            img = low_light(img, out=last_out)
        if flip:
            # cv2.flip: a SIMD copy; a [:, ::-1] view is slower
            return cv2.flip(np.ascontiguousarray(img), 1, dst=out)
        if out is not None:
            if img is not out:
                out[...] = img
            return out
        return img

    def __repr__(self) -> str:
        return f"TrainTransform({self.__dict__})"


class EvalTransform:
    """Deterministic evaluation transform: center crop, resize, optional low light.

    ``image_size=None`` keeps the (cropped) image's size; the evaluator uses that for targets
    stored at the network's input size.
    """

    def __init__(
        self, image_size: int | None = 112, *, center_crop: int = 0, low_light: bool = False
    ):
        self.image_size = image_size
        self.center_crop = center_crop
        self.low_light = low_light

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        if self.center_crop:
            img = center_crop(img, self.center_crop)
        if self.image_size is not None:
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

    dev = images.device
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev)
    if m.ndim == 1:
        m = m.view(1, -1, 1, 1)
    if s.ndim == 1:
        s = s.view(1, -1, 1, 1)
    # /255, then -mean, then /std, in that order: training and evaluation see the same bits
    return images.to(torch.float32, copy=True).div_(255.0).sub_(m).div_(s)
