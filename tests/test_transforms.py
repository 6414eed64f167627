"""Transforms: shapes, dtypes, exact formulas, reproducibility, config wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_train.config import DataConfig, load_config
from dist_train.data.transforms import (
    EvalTransform,
    TrainTransform,
    center_crop,
    color_jitter,
    low_light,
    normalize,
    random_resized_crop,
    resize,
)


def _img(h=120, w=100, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_low_light_formula_on_every_value():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.clip(np.sqrt(np.arange(256.0)) * 2, 0, 255).astype(np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(low_light(x), expected)
    assert low_light(x).dtype == np.uint8 and low_light(x).max() == 31
    with pytest.raises(TypeError):
        low_light(x.astype(np.float32))


def test_center_crop_and_resize():
    img = _img(120, 100)
    c = center_crop(img, 80)
    np.testing.assert_array_equal(c, img[20:100, 10:90])
    assert center_crop(img, 0) is img
    assert resize(img, 112).shape == (112, 112, 3)
    assert resize(img, 160).shape == (160, 160, 3)
    flat = np.full((50, 50, 3), 77, np.uint8)
    assert np.all(resize(flat, 20) == 77)


def test_random_resized_crop_area_and_determinism():
    img = np.zeros((100, 100, 3), np.uint8)
    img[:, :50] = 255  # left half white
    outs = [random_resized_crop(img, 64, np.random.default_rng(s), (0.8, 1.0)) for s in range(20)]
    assert all(o.shape == (64, 64, 3) and o.dtype == np.uint8 for o in outs)
    # the crop covers >= 80% of the area, so the white fraction stays near one half
    fracs = [o[..., 0].mean() / 255 for o in outs]
    assert all(0.3 < f < 0.7 for f in fracs) and len(set(np.round(fracs, 4))) > 1
    a = random_resized_crop(img, 64, np.random.default_rng(5))
    b = random_resized_crop(img, 64, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_color_jitter_factor_range():
    img = np.full((8, 8, 3), 100, np.uint8)  # gray: contrast and saturation do nothing
    for s in range(30):
        out = color_jitter(img, np.random.default_rng(s), 0.7)
        b = np.random.default_rng(s).uniform(0.3, 1.7, 3)[0]
        assert abs(int(out[0, 0, 0]) - np.clip(100 * b, 0, 255)) <= 1
    assert np.array_equal(color_jitter(img, np.random.default_rng(0), 0.0), img)


def _jitter_reference(img, b, c, s):
    """Brightness, contrast, saturation in float64, one rounding and clip at the end."""
    w = np.array([0.299, 0.587, 0.114])
    y = b * img.astype(np.float64)
    z = c * y + (1 - c) * (y @ w).mean()
    out = s * z + (1 - s) * (z @ w)[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_color_jitter_matches_the_formula_written_out():
    img = _img(112, 112)
    for seed in range(40):
        b, c, s = np.random.default_rng(seed).uniform(0.3, 1.7, 3)
        out = color_jitter(img, np.random.default_rng(seed), 0.7)
        diff = np.abs(out.astype(int) - _jitter_reference(img, b, c, s).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.1  # OpenCV rounds in fixed point
    # a mid-range image (no clipping anywhere) agrees with clipping after every step
    soft = np.random.default_rng(1).integers(100, 140, (32, 32, 3), dtype=np.uint8)
    b, c, s = 1.1, 0.8, 1.2
    x = np.clip(b * soft.astype(np.float64), 0, 255)
    x = np.clip(c * x + (1 - c) * (x @ [0.299, 0.587, 0.114]).mean(), 0, 255)
    x = np.clip(s * x + (1 - s) * (x @ [0.299, 0.587, 0.114])[..., None], 0, 255)

    class Fixed:
        draws = iter([(b - 0.3) / 1.4, (c - 0.3) / 1.4, (s - 0.3) / 1.4])

        def random(self):
            return next(self.draws)

    got = color_jitter(soft, Fixed(), 0.7)
    assert np.abs(got.astype(int) - np.round(x).astype(int)).max() <= 1
    # saturation 0 leaves gray; the result can be written into a given array
    draws = iter([0.5, 0.5, 0.0])  # strength 1: brightness 1, contrast 1, saturation 0
    gray = color_jitter(img, type("R", (), {"random": lambda self: next(draws)})(), 1.0)
    luma = np.round(img.astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(gray.astype(int) - luma[..., None].astype(int)).max() <= 1
    dst = np.empty_like(img)
    assert color_jitter(img, np.random.default_rng(3), 0.7, out=dst) is dst
    np.testing.assert_array_equal(dst, color_jitter(img, np.random.default_rng(3), 0.7))


def test_train_transform_writes_into_out_what_it_returns():
    img = _img(100, 90)
    for kw in ({}, {"random_resized_crop": True, "color_jitter": 0.5}, {"low_light": True}):
        t = TrainTransform(64, **kw)
        for seed in range(8):
            dst = np.zeros((64, 64, 3), np.uint8)
            assert t(img, np.random.default_rng(seed), out=dst) is dst
            np.testing.assert_array_equal(dst, t(img, np.random.default_rng(seed)))


def test_train_transform_flip_and_reproducible():
    img = _img(112, 112)
    t = TrainTransform(112, hflip=True)
    outs = [t(img, np.random.default_rng(s)) for s in range(16)]
    flipped = sum(np.array_equal(o, img[:, ::-1]) for o in outs)
    same = sum(np.array_equal(o, img) for o in outs)
    assert flipped + same == 16 and 0 < flipped < 16
    np.testing.assert_array_equal(
        t(img, np.random.default_rng(3)), t(img, np.random.default_rng(3))
    )


def test_train_transform_from_config_yaml(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "data:\n  image_size: 64\n  random_resized_crop: true\n  color_jitter: 0.7\n"
        "  center_crop: 100\n  low_light: true\n  hflip: false\n"
    )
    cfg = load_config(cfg_file).data
    t = TrainTransform.from_config(cfg)
    assert (t.image_size, t.random_resized_crop, t.color_jitter, t.center_crop) == (
        64,
        True,
        0.7,
        100,
    )
    out = t(_img(), np.random.default_rng(0))
    assert out.shape == (64, 64, 3) and out.max() <= 31  # low light applied last
    e = EvalTransform(64, center_crop=100)
    assert e(_img()).shape == (64, 64, 3)
    assert TrainTransform.from_config(DataConfig()).hflip is True


def test_normalize_matches_formula_and_device():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = normalize(x, 0.5, 0.5)
    assert y.dtype == torch.float32 and y.device == x.device
    torch.testing.assert_close(y, (x.float() / 255 - 0.5) / 0.5)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(normalize(x, mean, std), ref)


def test_sample_random_is_deterministic_and_uniform():
    from dist_train.data.transforms import SampleRandom

    a = [SampleRandom(1, 2, 3, 4).random() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert SampleRandom(1, 2, 3, 5).random() != a[0]
    r = SampleRandom(7)
    u = np.array([r.random() for _ in range(20000)])
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.histogram(u, 10)[0] / 2000 - 1).max() < 0.1
    firsts = np.array([SampleRandom(0, 0, 0, k).random() for k in range(5000)])
    assert abs(firsts.mean() - 0.5) < 0.02  # neighbouring seeds are not correlated


def test_preset_randoms_equal_sample_random_call_for_call():
    from dist_train.data.transforms import SampleRandom, preset_randoms

    rng = np.random.default_rng(0)
    keys = np.concatenate(
        [
            np.array([[0, 0, 0, 0], [-1, -1, -1, -1], [2**63 - 1, -(2**63), 1, 2]], np.int64),
            rng.integers(-(2**63), 2**63 - 1, size=(200, 4), dtype=np.int64),
            np.stack([np.zeros(50, np.int64)] * 3 + [np.arange(50)], 1),
        ]
    )
    for draws in (0, 1, 4):
        for key, fast in zip(keys.tolist(), preset_randoms(keys, draws)):
            ref = SampleRandom(*key)
            # past the precomputed draws the Python continuation takes over, still exact
            assert [fast.random() for _ in range(7)] == [ref.random() for _ in range(7)], key
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        preset_randoms(np.zeros(3, np.int64), 1)
