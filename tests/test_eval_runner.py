"""Tests of eval.extract and eval.runner: flip TTA, low light, autocast, rank shards, loading."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from eval import metrics
from eval.extract import embed_batch, extract_embeddings, low_light, unwrap
from eval.options import EvalOptions
from eval.runner import (
    ModelLoadError,
    evaluate_targets,
    evaluate_targets_full,
    load_backbone,
    load_model,
    normalisation_from,
    read_weights,
    score_target,
)
from eval.targets import TargetError, load_bin, load_target, save_bin
from tests.dist_utils import run_distributed
from tests.eval_helpers import TINY, TinyNet, encode, tiny_backbone, write_targets  # noqa: F401


def _images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_low_light_matches_formula():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ref = np.clip(np.sqrt(x.astype(np.float64)) * 2.0, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(low_light(x), ref)
    assert low_light(np.array([255], np.uint8))[0] == 31
    with pytest.raises(TypeError):
        low_light(x.astype(np.float32))


def test_embed_batch_flip_normalisation_and_low_light():
    net = TinyNet(8).eval()
    imgs = _images()
    x = (torch.from_numpy(imgs).float() / 255 - 0.4) / 0.3
    with torch.no_grad():
        ref = net(x) + net(torch.flip(x, dims=[3]))
        ref_norms = torch.stack([net(x).norm(dim=1), net(torch.flip(x, dims=[3])).norm(dim=1)], 1)
    emb, norms = embed_batch(net, imgs, EvalOptions(mean=0.4, std=0.3), device=torch.device("cpu"))
    np.testing.assert_allclose(emb, ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norms, ref_norms.numpy(), rtol=1e-5)
    no_flip = EvalOptions(flip=False)
    emb1, norms1 = embed_batch(net, imgs, no_flip, device=torch.device("cpu"))
    with torch.no_grad():
        np.testing.assert_allclose(emb1, net((torch.from_numpy(imgs).float() / 255 - 0.5) / 0.5))
    assert norms1.shape == (5, 1)
    # Low light is part of preparing the images (the training evaluation transform).
    dark_transform = EvalOptions(flip=False, low_light=True).transform()
    prepared = np.stack([dark_transform(im.transpose(1, 2, 0)).transpose(2, 0, 1) for im in imgs])
    dark, _ = embed_batch(net, prepared, no_flip, device=torch.device("cpu"))
    same, _ = embed_batch(net, low_light(imgs), no_flip, device=torch.device("cpu"))
    np.testing.assert_array_equal(dark, same)


def test_embed_batch_bf16_close_to_fp32():
    net = TinyNet(8).eval()
    imgs = _images()
    fp32, _ = embed_batch(net, imgs, device=torch.device("cpu"))
    bf16, _ = embed_batch(net, imgs, EvalOptions(amp="bf16"), device=torch.device("cpu"))
    assert bf16.dtype == np.float32
    assert np.max(np.abs(bf16 - fp32)) < 0.05 * np.max(np.abs(fp32))
    with pytest.raises(ValueError, match="amp"):
        embed_batch(net, imgs, EvalOptions(amp="int8"), device=torch.device("cpu"))


def test_extract_batches_restore_mode_and_unwrap():
    net = TinyNet(8)
    net.train()
    imgs = _images(11)
    full = extract_embeddings(
        net, lambda a, b: imgs[a:b], 11, EvalOptions(batch_size=4), device=torch.device("cpu")
    )
    assert net.training  # mode restored
    one, _ = embed_batch(net.eval(), imgs, device=torch.device("cpu"))
    np.testing.assert_allclose(full.embeddings, one, rtol=1e-5, atol=1e-6)
    wrapped = nn.DataParallel(net)
    assert unwrap(wrapped) is net


def _extract_on_ranks(rank, world_size, imgs):
    net = TinyNet(8)
    seen = []

    def load(a, b):
        seen.append((a, b))
        return imgs[a:b]

    two = EvalOptions(batch_size=2)
    out = extract_embeddings(net, load, len(imgs), two, device=torch.device("cpu"))

    def broken(a, b):
        if b > 5:
            raise ValueError(f"cannot decode image {b - 1}")
        return imgs[a:b]

    # A failure on one rank must stop every rank (not leave rank 0 waiting in the gather).
    with pytest.raises(RuntimeError, match="rank 1: ValueError: cannot decode image 5") as err:
        extract_embeddings(net, broken, len(imgs), two, device=torch.device("cpu"))
    return out.embeddings, out.xnorm, seen, str(err.value)


@pytest.mark.slow
def test_extract_spreads_shards_over_two_ranks():
    imgs = _images(7)
    results = run_distributed(_extract_on_ranks, 2, imgs)
    single = extract_embeddings(TinyNet(8), lambda a, b: imgs[a:b], 7, device=torch.device("cpu"))
    for emb, xn, _, _ in results:
        np.testing.assert_allclose(emb, single.embeddings, rtol=1e-5, atol=1e-6)
        assert xn == pytest.approx(single.xnorm)
    # Rank 0 embedded images 0..3, rank 1 images 4..6: each rank only its contiguous shard.
    assert results[0][2] == [(0, 2), (2, 4)] and results[1][2] == [(4, 6), (6, 7)]


def test_evaluate_targets_bin_and_csv_agree_and_are_good(tmp_path):
    bin_path, csv_path, _, issame = write_targets(str(tmp_path))
    net = TinyNet(16)
    seen = []
    net.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    out = evaluate_targets(net, [bin_path, csv_path], device="cpu", batch_size=8)
    # Both files hold the same images: each is embedded once (two views with flip).
    assert sum(seen) == 2 * load_target(bin_path).num_images
    assert list(out) == ["val", "val_pairs"]
    for key in ("accuracy", "accuracy_std", "eer", "auc", "tar@far=1e-1", "best_f1", "xnorm"):
        assert out["val"][key] == pytest.approx(out["val_pairs"][key], rel=1e-5, abs=1e-6), key
    # Same-identity images share a colour pattern: the pooled projection separates them.
    assert out["val"]["accuracy"] >= 0.9 and out["val"]["eer"] <= 0.15
    assert np.isnan(out["val"]["tar@far=1e-3"])  # 12 impostors cannot measure FAR 1e-3


def test_evaluate_targets_full_matches_metrics_on_its_embeddings(tmp_path):
    bin_path, _, test_path, issame = write_targets(str(tmp_path))
    res = evaluate_targets_full(TinyNet(16), [bin_path, test_path], device="cpu", n_folds=4)
    r = res["val"]
    e1, e2 = r.embeddings[r.target.pairs[:, 0]], r.embeddings[r.target.pairs[:, 1]]
    mean, std = metrics.kfold_accuracy(e1, e2, issame, n_folds=4)
    assert r.metrics["accuracy"] == mean and r.metrics["accuracy_std"] == std
    assert r.metrics["eer"] == metrics.eer(metrics.cosine_scores(e1, e2), issame)[0]
    # XNorm as InsightFace: mean single-view norm over the 2P pair sides (both views).
    net = TinyNet(16).eval()
    sides = np.concatenate([r.target.pairs[:, 0:1], r.target.pairs[:, 1:2]], 1).ravel()
    x = torch.from_numpy(r.target.load_images(0, r.target.num_images)).float() / 127.5 - 1
    with torch.no_grad():
        norms = torch.stack([net(x).norm(dim=1), net(torch.flip(x, dims=[3])).norm(dim=1)], 1)
    assert r.metrics["xnorm"] == pytest.approx(float(norms.double()[sides].mean()), rel=1e-5)
    assert len(r.kfold.fold_thresholds) == 4 and r.best_f1 is not None
    curves = r.curves()
    assert curves["fpr"][-1] == 1.0 and curves["tpr"][-1] == 1.0
    test = res["test"]
    assert test.issame is None and set(test.metrics) == {"num_pairs", "xnorm"}
    np.testing.assert_allclose(test.scores, r.scores, rtol=1e-5, atol=1e-6)


def test_score_target_requires_both_classes(tmp_path):
    bin_path, _, _, _ = write_targets(str(tmp_path), num_ids=3)
    t = load_target(bin_path)
    t.issame = np.ones_like(t.issame)
    with pytest.raises(ValueError, match="val.bin"):
        score_target(t, np.random.default_rng(0).normal(size=(t.num_images, 4)))


# ---------------------------------------------------------------------------------------------
# Loading weights
# ---------------------------------------------------------------------------------------------


def _same_output(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), rtol=1e-5, atol=1e-6)


def _trained_like(d=12) -> TinyNet:
    net = TinyNet(d)
    with torch.no_grad():
        net.fc.weight.mul_(3.0).add_(0.1)
    return net.eval()


@pytest.mark.usefixtures("tiny_backbone")
def test_load_backbone_from_state_dict_checkpoint_and_safetensors(tmp_path):
    net = _trained_like()
    plain = tmp_path / "model.pt"
    torch.save(net.state_dict(), plain)
    _same_output(net, load_backbone(str(plain), TINY, 12))
    # Training checkpoint with config (network and size come from it) and numpy RNG state.
    ckpt = tmp_path / "step_00000010.pt"
    torch.save(
        {
            "backbone": {f"module.{k}": v for k, v in net.state_dict().items()},
            "config": {
                "backbone": {"name": TINY, "embedding_size": 12, "params": {}},
                "data": {"mean": 0.4, "std": 0.2},
            },
            "rng": {"numpy": np.random.get_state()},
            "step": 10,
        },
        ckpt,
    )
    _same_output(net, load_backbone(str(ckpt)))
    model, config = load_model(str(ckpt))
    _same_output(net, model)
    assert normalisation_from(config) == {"mean": 0.4, "std": 0.2}
    assert normalisation_from(None) == {}
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file(net.state_dict(), str(st))
    _same_output(net, load_backbone(str(st), TINY, 12))


@pytest.mark.usefixtures("tiny_backbone")
def test_load_backbone_errors(tmp_path, capsys):
    net = _trained_like()
    plain = tmp_path / "model.pt"
    torch.save(net.state_dict(), plain)
    with pytest.raises(ModelLoadError, match="model.pt.*do not fit"):
        load_backbone(str(plain), TINY, 7)
    with pytest.raises(ModelLoadError, match="model.pt: no --network"):
        load_backbone(str(plain))
    with pytest.raises(ModelLoadError, match="nope.pt"):
        load_backbone(str(tmp_path / "nope.pt"), TINY)
    with pytest.raises(KeyError, match="unknown backbone"):
        load_backbone(str(plain), "_no_such_net", 12)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"backbone": Evil()}, f, protocol=2)
    torch.save({"backbone": net.state_dict(), "extra": Evil()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(ModelLoadError, match=f"{name}.*nothing in it was executed.*print"):
            read_weights(str(tmp_path / name))
    assert "executed" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy ONNX exporter
def test_load_backbone_onnx(tmp_path):
    net = _trained_like()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        net, (torch.randn(1, 3, 32, 32),), str(path), input_names=["x"], dynamo=False
    )  # fixed batch of 1: the wrapper feeds chunks
    model = load_backbone(str(path))
    assert model.fixed_batch == 1
    _same_output(net, model)


def test_targets_with_different_image_sizes_need_image_size(tmp_path):
    bin_path, _, _, _ = write_targets(str(tmp_path / "a"), num_ids=4)
    bins, issame = load_bin(bin_path)
    small = [
        encode(cv2.resize(cv2.imdecode(np.frombuffer(b, np.uint8), 1), (16, 16))) for b in bins
    ]
    other = str(tmp_path / "small.bin")
    save_bin(other, small, issame)
    with pytest.raises(TargetError, match="small.bin.*different sizes.*image_size"):
        evaluate_targets_full(TinyNet(16), [bin_path, other], batch_size=64)
    res = evaluate_targets_full(TinyNet(16), [bin_path, other], image_size=24, n_folds=2)
    assert set(res) == {"val", "small"}


def test_eval_options_from_train_config_and_overrides():
    from dist_train.config import DataConfig, EvalConfig, TrainConfig

    cfg = TrainConfig(
        amp="bf16",
        data=DataConfig(image_size=96, center_crop=100, mean=0.4, std=0.2),
        eval=EvalConfig(batch_size=16, flip=False, low_light=True),
    )
    assert EvalOptions.from_train_config(cfg) == EvalOptions(
        batch_size=16,
        flip=False,
        low_light=True,
        mean=0.4,
        std=0.2,
        amp="bf16",
        image_size=96,
        center_crop=100,
    )
    base = EvalOptions(flip=False)
    assert EvalOptions.with_overrides(base, batch_size=8) == EvalOptions(flip=False, batch_size=8)
    assert EvalOptions.with_overrides(None) == EvalOptions()
    with pytest.raises(TypeError):
        EvalOptions.with_overrides(base, no_such_option=1)
    with pytest.raises(ValueError, match="batch_size"):
        EvalOptions(batch_size=0)
    transform = EvalOptions(image_size=24, center_crop=30, low_light=True).transform()
    assert (transform.image_size, transform.center_crop, transform.low_light) == (24, 30, True)


def test_read_weights_strips_every_wrapper_prefix(tmp_path):
    net = TinyNet(8)
    path = tmp_path / "compiled.pt"
    state = {f"_orig_mod.module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"backbone": state, "config": {"amp": "none"}}, path)
    got, config = read_weights(str(path))
    assert list(got) == list(net.state_dict()) and config == {"amp": "none"}
