"""Backbone zoo: registry-wide forward/backward, parameter counts, key layouts, checkpointing,
channels_last, bf16 autocast, stages() and weight loading."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch import nn

import backbones
from backbones.resnet import load_torchvision_state_dict

# Small inputs keep CPU tests fast. iResNet and MobileFaceNet size their last layer from
# input_size (a multiple of 16); a ViT its patch count (36 = 4 x 4 patches of 9); the others
# pool adaptively after a stride of 32.
FIXED_INPUT = ("iresnet", "mobilefacenet", "vit")
# Seconds to build on CPU even at a small input (tens of millions of parameters in the blocks):
# their registry-wide forward/backward runs with the slow tests; vit_t stands for the family.
HEAVY = ("vit_s", "vit_b", "vit_l")


def small_size(name: str) -> int:
    if name.startswith("vit"):
        return 36
    return 16 if name.startswith(FIXED_INPUT) else 32


def build_small(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith(FIXED_INPUT):
        kwargs["input_size"] = small_size(name)
    return backbones.get_backbone(name, embedding_size=8, **kwargs)


def registry_cases() -> list:
    """Every registered name, the heavy ones marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in backbones.names()]


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_build(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return backbones.get_backbone(name, **kwargs)


def family_representatives() -> list[str]:
    """The smallest registered network of each family (the class its builder makes): the
    fewest parameters at its defaults, counted on the meta device (iresnet18,
    efficientnet_b0, vit_t); ties go to the first in natural order, where numbers compare as
    numbers.

    The heavier behaviour tests run on one network per family: every family shares its
    checkpointing, head and stages() code between its sizes. A new family is included
    without editing a list.
    """

    def natural(name: str) -> list[int | str]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    first: dict[object, str] = {}
    for name in sorted(backbones.names(), key=lambda n: (count(meta_build(n)), natural(n))):
        first.setdefault(backbones.BACKBONES.product(name) or name, name)  # unannotated: alone
    return sorted(first.values())


FAMILY_REPS = family_representatives()


def test_registry_lists_every_family():
    expected = {
        "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200",
        "thin_resnet34", "thin_resnet50", "thin_resnet50_v2", "resnet34", "resnet50",
        "efficientnet_b0", "efficientnet_b3", "mobilefacenet",
    }  # fmt: skip
    assert expected <= set(backbones.names())


@pytest.mark.parametrize("name", registry_cases())
def test_forward_backward_every_parameter_gets_gradient(name):
    model = build_small(name).train()
    out = model(images(size=small_size(name)))
    assert out.shape == (2, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for key, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {key} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {key} has a non-finite gradient"
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    # Only arcface_torch's fixed BatchNorm1d scale is frozen by design.
    assert frozen == (["features.weight"] if name.startswith("iresnet") else [])


@pytest.mark.parametrize("name", backbones.names())
def test_stages_cover_trunk_without_overlap(name):
    model = meta_build(name, embedding_size=8)
    keys = set(model.state_dict())
    stages = model.stages()
    assert len(stages) >= 5
    seen: set[int] = set()
    for stage in stages:
        ids = {id(p) for p in stage.parameters()}
        assert ids and not ids & seen
        seen |= ids
    # Only the embedding head lies outside the stages (a ViT's: final LayerNorm + feature).
    outside = [k for k, p in model.named_parameters() if id(p) not in seen]
    head = ("bn2.", "fc.", "features.", "linear.", "norm.", "feature.")
    assert outside and all(k.startswith(head) for k in outside)
    # Building the stage views leaves the state-dict layout untouched.
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_frozen_stem_gets_no_gradient(name):
    model = build_small(name)
    stages = model.stages()
    for p in stages[0].parameters():
        p.requires_grad_(False)
    model(images(size=small_size(name))).sum().backward()
    assert all(p.grad is None for p in stages[0].parameters())
    assert all(p.grad is not None for p in stages[1].parameters())


def test_iresnet_parameter_counts_match_insightface():
    expected = {
        "iresnet18": 24_025_600,
        "iresnet34": 34_139_328,
        "iresnet50": 43_590_848,
        "iresnet100": 65_156_160,
        "iresnet200": 118_833_920,
    }
    got = {name: count(meta_build(name, embedding_size=512)) for name in expected}
    assert got == expected


def _iresnet_reference_keys(layers: list[int]) -> dict[str, tuple[int, ...]]:
    """arcface_torch's iresnet state-dict keys and shapes, written from its description."""

    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.weight": (c,),
            f"{prefix}.bias": (c,),
            f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,),
            f"{prefix}.num_batches_tracked": (),
        }

    keys = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64), "prelu.weight": (64,)}
    cin = 64
    for i, (n, c) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for j in range(n):
            p = f"layer{i}.{j}"
            keys.update(bn(f"{p}.bn1", cin))
            keys[f"{p}.conv1.weight"] = (c, cin, 3, 3)
            keys.update(bn(f"{p}.bn2", c))
            keys[f"{p}.prelu.weight"] = (c,)
            keys[f"{p}.conv2.weight"] = (c, c, 3, 3)
            keys.update(bn(f"{p}.bn3", c))
            if j == 0:
                keys[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                keys.update(bn(f"{p}.downsample.1", c))
            cin = c
    keys.update(bn("bn2", 512))
    keys.update({"fc.weight": (512, 512 * 49), "fc.bias": (512,)})
    keys.update(bn("features", 512))
    return keys


@pytest.mark.parametrize("name,layers", [("iresnet18", [2, 2, 2, 2]), ("iresnet50", [3, 4, 14, 3])])
def test_iresnet_state_dict_layout_matches_arcface_torch(name, layers):
    state = meta_build(name).state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == _iresnet_reference_keys(layers)


def test_iresnet_forward_follows_arcface_order():
    """Recomputes iresnet18 (eval mode) from its weights with functional ops in arcface_torch's
    order: stem conv-BN-PReLU; per block BN-conv-BN-PReLU-conv(stride)-BN + shortcut (1x1
    conv(stride)-BN); then BN2d, flatten, FC, BN1d."""
    import torch.nn.functional as F

    model = build_small("iresnet18").eval()
    for m in model.modules():  # non-trivial statistics so every BN matters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.bias.data.uniform_(-0.5, 0.5)

    def bn(m, x):
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    x = images(size=16)
    with torch.no_grad():
        h = F.prelu(bn(model.bn1, F.conv2d(x, model.conv1.weight, padding=1)), model.prelu.weight)
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for j, blk in enumerate(layer):
                stride = 2 if j == 0 else 1
                out = F.conv2d(bn(blk.bn1, h), blk.conv1.weight, padding=1)
                out = F.prelu(bn(blk.bn2, out), blk.prelu.weight)
                out = bn(blk.bn3, F.conv2d(out, blk.conv2.weight, stride=stride, padding=1))
                if blk.downsample is not None:
                    conv, norm = blk.downsample
                    h = bn(norm, F.conv2d(h, conv.weight, stride=stride))
                h = out + h
        assert h.shape[-2:] == (1, 1)  # 16 / 16, as 112 / 16 = 7
        emb = bn(
            model.features, F.linear(bn(model.bn2, h).flatten(1), model.fc.weight, model.fc.bias)
        )
        torch.testing.assert_close(model(x), emb, rtol=1e-5, atol=1e-5)


def _bottleneck_params(cin: int, width: int, downsample: bool) -> int:
    out = 4 * width
    convs = cin * width + 9 * width * width + width * out + (cin * out if downsample else 0)
    bns = 2 * (width + width + out + (out if downsample else 0))
    return convs + bns


def _thin_resnet_params(layers: list[int], widths: list[int], d: int = 512) -> int:
    total = 3 * 64 * 49 + 2 * 64  # 7x7 stem + BN
    cin = 64
    for n, w in zip(layers, widths):
        total += _bottleneck_params(cin, w, True)
        total += (n - 1) * _bottleneck_params(4 * w, w, False)
        cin = 4 * w
    return total + cin * d + d


@pytest.mark.parametrize(
    "name,layers,widths,report_table_millions",
    [
        ("thin_resnet34", [2, 3, 3, 3], [48, 96, 128, 256], 5.92),
        ("thin_resnet50", [3, 4, 6, 3], [48, 96, 128, 256], 6.96),
        ("thin_resnet50_v2", [3, 4, 6, 3], [48, 96, 192, 384], 14.03),
    ],
)
def test_thin_resnet_counts_follow_the_table(name, layers, widths, report_table_millions):
    got = count(meta_build(name, embedding_size=512))
    assert got == _thin_resnet_params(layers, widths)
    assert round(got / 1e6, 2) == report_table_millions


@pytest.mark.parametrize(
    "name,torchvision_total", [("resnet34", 21_797_672), ("resnet50", 25_557_032)]
)
def test_resnet_trunk_matches_torchvision(name, torchvision_total):
    model = meta_build(name, embedding_size=512)
    trunk = sum(
        p.numel() for k, p in model.named_parameters() if not k.startswith(("fc.", "features."))
    )
    feat = model.fc.in_features
    assert trunk + feat * 1000 + 1000 == torchvision_total  # + ImageNet's classifier


@pytest.mark.parametrize(
    "name,torchvision_total", [("efficientnet_b0", 5_288_548), ("efficientnet_b3", 12_233_232)]
)
def test_efficientnet_trunk_matches_torchvision(name, torchvision_total):
    model = meta_build(name, embedding_size=512)
    trunk = sum(
        p.numel() for k, p in model.named_parameters() if not k.startswith(("fc.", "features."))
    )
    feat = model.fc.in_features
    assert trunk + feat * 1000 + 1000 == torchvision_total
    if name == "efficientnet_b3":
        assert round(count(model) / 1e6, 1) == 11.5  # the CASIA report's figure with its head


def test_mobilefacenet_is_the_papers_size():
    model = meta_build("mobilefacenet", embedding_size=128)
    assert abs(count(model) - 0.99e6) / 0.99e6 < 0.02
    half = meta_build("mobilefacenet", embedding_size=128, width_mult=0.5)
    assert count(half) < 0.4 * count(model)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {f"grad:{k}": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    bufs = {f"buf:{k}": b.clone() for k, b in model.named_buffers()}
    return {**grads, **bufs}


@pytest.mark.parametrize("mode", ["stage", "block"])
@pytest.mark.parametrize("name", FAMILY_REPS)
def test_checkpointing_gives_identical_gradients_and_bn_stats(name, mode):
    x = images(batch=3, size=small_size(name))
    results = []
    for ckpt in ("none", mode):
        model = build_small(name, checkpointing=ckpt).train()
        model(x).square().mean().backward()
        results.append(_snapshot(model))
    ref, got = results
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_checkpointing_rejects_unknown_mode():
    with pytest.raises(ValueError, match="checkpointing"):
        backbones.get_backbone("iresnet18", checkpointing="layer")


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_channels_last_matches_contiguous(name):
    model = build_small(name).eval()
    x = images(size=small_size(name))
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_bf16_autocast_on_cpu_trains_with_fp32_embeddings(name):
    model = build_small(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(size=small_size(name)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_fixed_input_networks_reject_other_sizes_clearly():
    model = backbones.get_backbone("iresnet18", embedding_size=8, input_size=32)
    with pytest.raises(ValueError, match="input_size"):
        model(images(size=64))
    with pytest.raises(ValueError, match="divisible by 16"):
        backbones.get_backbone("iresnet18", input_size=(112, 100))
    with pytest.raises(ValueError, match="divisible by 16"):
        backbones.get_backbone("mobilefacenet", input_size=100)


@pytest.mark.parametrize("size", [112, 160])
def test_resnet_accepts_any_input_size(size):
    model = backbones.get_backbone("resnet34", embedding_size=16).eval()
    with torch.no_grad():
        assert model(images(batch=1, size=size)).shape == (1, 16)


def _torchvision_resnet_state(depth: int) -> dict[str, torch.Tensor]:
    """A random state dict with torchvision's resnet{34,50} keys and shapes, built from the
    layout description (no torchvision needed)."""
    g = torch.Generator().manual_seed(3)
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{k}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    cin = 64
    for i, (n, w) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for j in range(n):
            p = f"layer{i}.{j}"
            out = w if depth == 34 else 4 * w
            if depth == 34:
                shapes[f"{p}.conv1.weight"] = (w, cin, 3, 3)
                bn(f"{p}.bn1", w)
                shapes[f"{p}.conv2.weight"] = (w, w, 3, 3)
                bn(f"{p}.bn2", w)
            else:
                shapes[f"{p}.conv1.weight"] = (w, cin, 1, 1)
                bn(f"{p}.bn1", w)
                shapes[f"{p}.conv2.weight"] = (w, w, 3, 3)
                bn(f"{p}.bn2", w)
                shapes[f"{p}.conv3.weight"] = (out, w, 1, 1)
                bn(f"{p}.bn3", out)
            if j == 0 and (i > 1 or cin != out):
                shapes[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
                bn(f"{p}.downsample.1", out)
            cin = out
    shapes["fc.weight"] = (1000, cin)
    shapes["fc.bias"] = (1000,)
    state = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        else:
            state[k] = torch.rand(s, generator=g) + 0.5
    return state


@pytest.mark.parametrize("depth", [34, 50])
def test_load_torchvision_state_dict(depth, tmp_path):
    model = backbones.get_backbone(f"resnet{depth}", embedding_size=16)
    fc_before = model.fc.weight.detach().clone()
    state = _torchvision_resnet_state(depth)
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    report = load_torchvision_state_dict(model, path)
    assert report.unexpected == ["fc.bias", "fc.weight"]
    assert report.mismatched == []
    assert sorted(report.missing) == sorted(
        k for k in model.state_dict() if k.startswith(("fc.", "features."))
    )
    own = model.state_dict()
    assert len(report.loaded) == len(state) - 2
    for key in report.loaded:
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)
    torch.testing.assert_close(model.fc.weight, fc_before)


def test_load_torchvision_state_dict_rejects_foreign_file():
    model = backbones.get_backbone("resnet34", embedding_size=16)
    with pytest.raises(ValueError, match="no key matches"):
        load_torchvision_state_dict(model, {"encoder.weight": torch.zeros(3)})


class TestLoadWeights:
    @pytest.fixture
    def trained(self):
        torch.manual_seed(5)
        model = backbones.get_backbone("mobilefacenet", embedding_size=8, input_size=32)
        for p in model.parameters():
            p.data.normal_()
        return model

    def _fresh(self):
        return backbones.get_backbone("mobilefacenet", embedding_size=8, input_size=32)

    def _assert_same(self, a: nn.Module, b: nn.Module) -> None:
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)

    def test_plain_state_dict(self, trained, tmp_path):
        torch.save(trained.state_dict(), tmp_path / "model.pt")
        self._assert_same(backbones.load_weights(self._fresh(), tmp_path / "model.pt"), trained)

    def test_training_checkpoint_with_ddp_prefix(self, trained, tmp_path):
        ckpt = {
            "backbone": {f"module.{k}": v for k, v in trained.state_dict().items()},
            "step": 10,
            "optimizer": {"state": {}, "param_groups": []},
        }
        torch.save(ckpt, tmp_path / "step.pt")
        self._assert_same(backbones.load_weights(self._fresh(), tmp_path / "step.pt"), trained)

    def test_safetensors(self, trained, tmp_path):
        from backbones.weights import read_safetensors_metadata, save_safetensors

        path = tmp_path / "w.safetensors"
        save_safetensors(trained, path, metadata={"network": "mobilefacenet"})
        assert read_safetensors_metadata(path) == {"network": "mobilefacenet"}
        self._assert_same(backbones.load_weights(self._fresh(), path), trained)

    def test_wrong_network_names_the_file_and_keys(self, trained, tmp_path):
        path = tmp_path / "model.pt"
        torch.save(trained.state_dict(), path)
        other = backbones.get_backbone("mobilefacenet", embedding_size=16, input_size=32)
        with pytest.raises(ValueError, match=r"model\.pt.*mis-shaped.*linear\.weight"):
            backbones.load_weights(other, path)

    def test_not_a_state_dict(self, tmp_path):
        path = tmp_path / "junk.pt"
        torch.save({"a": 1, "b": "x"}, path)
        with pytest.raises(ValueError, match="junk.pt.*not a state dict"):
            backbones.load_weights(self._fresh(), path)
        with pytest.raises(FileNotFoundError, match="missing.pt"):
            backbones.load_weights(self._fresh(), tmp_path / "missing.pt")

    def test_non_strict_skips_new_embedding_layer(self, trained, tmp_path):
        path = tmp_path / "model.pt"
        torch.save(trained.state_dict(), path)
        other = backbones.get_backbone("mobilefacenet", embedding_size=16, input_size=32)
        with pytest.warns(UserWarning, match="partial load.*linear.weight"):
            backbones.load_weights(other, path, strict=False)
        torch.testing.assert_close(other.stem[0][0].weight, trained.stem[0][0].weight)
        assert other.linear.weight.shape == (16, 512, 1, 1)

    def test_checkpoint_with_numpy_rng_state(self, trained, tmp_path):
        import numpy as np

        path = tmp_path / "step.pt"
        rng = {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save({"backbone": trained.state_dict(), "rng": rng}, path)
        # numpy arrays are admitted by the safe loader: no full unpickle, no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = backbones.load_weights(self._fresh(), path)
        self._assert_same(loaded, trained)

    def test_pickled_code_is_never_run(self, tmp_path):
        class Boom:
            def __reduce__(self):
                return (os.system, ("touch " + str(tmp_path / "ran"),))

        path = tmp_path / "evil.pt"
        torch.save({"backbone": {}, "x": Boom()}, path)
        with pytest.raises(ValueError, match="evil.pt: cannot load .* nothing in it was executed"):
            backbones.load_weights(self._fresh(), path)
        assert not (tmp_path / "ran").exists()
        torch.save(self._fresh(), tmp_path / "module.pt")  # a whole pickled model
        with pytest.raises(ValueError, match="module.pt: cannot load"):
            backbones.read_state_dict(tmp_path / "module.pt")


# ------------------------------------------------------------------------------------------
# ViT (arcface_torch's face ViT)

VIT_SIZES = {  # embed_dim, depth: arcface_torch's vit_t, vit_s, vit_b, vit_l_dp005_mask_005
    "vit_t": (256, 12),
    "vit_s": (512, 12),
    "vit_b": (512, 24),
    "vit_l": (768, 24),
}


def test_vit_parameter_counts_match_arcface_torch():
    expected = {
        "vit_t": 19_137_792,
        "vit_s": 76_023_296,
        "vit_b": 113_833_472,
        "vit_l": 255_684_352,  # computed from arcface_torch's vit_l_dp005_mask_005
    }
    got = {name: count(meta_build(name, embedding_size=512)) for name in expected}
    assert got == expected


def _vit_reference_keys(dim: int, depth: int, patches: int = 144, d: int = 512) -> dict:
    """arcface_torch's ViT state-dict keys and shapes, written from its definition."""

    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        stats = {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}
        return {**stats, f"{prefix}.num_batches_tracked": ()}

    keys = {
        "pos_embed": (1, patches, dim),
        "mask_token": (1, 1, dim),
        "patch_embed.proj.weight": (dim, 3, 9, 9),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}"
        keys.update({f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,)})
        keys[f"{p}.attn.qkv.weight"] = (3 * dim, dim)  # no qkv bias
        keys.update({f"{p}.attn.proj.weight": (dim, dim), f"{p}.attn.proj.bias": (dim,)})
        keys.update({f"{p}.norm2.weight": (dim,), f"{p}.norm2.bias": (dim,)})
        keys.update({f"{p}.mlp.fc1.weight": (4 * dim, dim), f"{p}.mlp.fc1.bias": (4 * dim,)})
        keys.update({f"{p}.mlp.fc2.weight": (dim, 4 * dim), f"{p}.mlp.fc2.bias": (dim,)})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    keys["feature.0.weight"] = (dim, patches * dim)
    keys.update(bn("feature.1", dim))
    keys["feature.2.weight"] = (d, dim)
    keys.update(bn("feature.3", d))
    return keys


@pytest.mark.parametrize("name", sorted(VIT_SIZES))
def test_vit_state_dict_layout_matches_arcface_torch(name):
    got = {k: tuple(v.shape) for k, v in meta_build(name).state_dict().items()}
    assert got == _vit_reference_keys(*VIT_SIZES[name])
    assert meta_build(name).num_patches == 144  # 112 // 9 = 12 per side


def _vit_functional(model, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode vit recomputed with plain ops in arcface_torch's order (attention by hand)."""
    import torch.nn.functional as F

    def ln(m, t):
        return F.layer_norm(t, m.normalized_shape, m.weight, m.bias, m.eps)

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    conv = model.patch_embed.proj
    h = F.conv2d(x, conv.weight, conv.bias, stride=9).flatten(2).transpose(1, 2) + model.pos_embed
    for blk in model.blocks:
        b, n, c = h.shape
        heads = blk.attn.num_heads
        qkv = F.linear(ln(blk.norm1, h), blk.attn.qkv.weight).reshape(b, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        h = h + F.linear(out, blk.attn.proj.weight, blk.attn.proj.bias)
        hidden = F.relu6(F.linear(ln(blk.norm2, h), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        h = h + F.linear(hidden, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    h = ln(model.norm, h).flatten(1)
    lin1, bn1, lin2, bn2 = model.feature
    return bn(bn2, F.linear(bn(bn1, F.linear(h, lin1.weight)), lin2.weight))


def test_vit_forward_follows_arcface_order():
    model = build_small("vit_t").double().eval()
    for m in model.feature.modules():  # non-trivial statistics so every BN matters
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    x = images(size=36).double()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _vit_functional(model, x), rtol=1e-10, atol=1e-10)


def _vit_trace(model, x: torch.Tensor, seed: int) -> dict:
    """Output, the token count the blocks see, and the tokens entering the feature head."""
    seen: dict = {}

    def blocks_in(m, args) -> None:
        seen.setdefault("block_tokens", args[0].shape[1])

    def head_in(m, args) -> None:
        seen["head_in"] = args[0].detach().clone()

    hooks = [
        model.blocks[0].register_forward_pre_hook(blocks_in),
        model.feature[0].register_forward_pre_hook(head_in),
    ]
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            seen["out"] = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _masked_positions(model, head_in: torch.Tensor) -> torch.Tensor:
    tokens = head_in.reshape(head_in.shape[0], model.num_patches, model.embed_dim)
    return (tokens == model.mask_token.detach()).all(dim=-1)  # [B, N] True where masked


def test_vit_masking_only_in_training_and_deterministic_under_a_seed():
    model = build_small("vit_t", drop_path_rate=0.0)  # randomness from masking only
    x = images(batch=3, size=36)
    assert model.num_patches == 16 and model.num_kept == 14  # int(16 * 0.9)
    model.train()
    a, b, c = (_vit_trace(model, x, seed) for seed in (3, 3, 4))
    assert a["block_tokens"] == 14
    masked_a, masked_c = (
        _masked_positions(model, a["head_in"]),
        _masked_positions(model, c["head_in"]),
    )
    assert masked_a.sum(dim=1).tolist() == [2, 2, 2]  # per sample, the dropped patches
    assert not torch.equal(masked_a[0], masked_a[1])  # drawn per sample
    torch.testing.assert_close(a["out"], b["out"], rtol=0, atol=0)  # same seed, same mask
    assert not torch.equal(masked_a, masked_c) and not torch.equal(a["out"], c["out"])
    model.eval()
    e1, e2 = _vit_trace(model, x, 3), _vit_trace(model, x, 4)
    assert e1["block_tokens"] == 16 and not _masked_positions(model, e1["head_in"]).any()
    torch.testing.assert_close(e1["out"], e2["out"], rtol=0, atol=0)


def test_vit_mask_ratio_zero_never_masks_and_freezes_the_token():
    model = build_small("vit_t", mask_ratio=0.0).train()
    assert not model.mask_token.requires_grad
    seen = _vit_trace(model, images(size=36), 0)
    assert seen["block_tokens"] == 16 and not _masked_positions(model, seen["head_in"]).any()
    assert build_small("vit_t").mask_token.requires_grad


def test_vit_rejects_bad_arguments_clearly():
    with pytest.raises(ValueError, match="mask_ratio"):
        backbones.get_backbone("vit_t", mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio=1e-20 keeps 144 of 144"):
        backbones.get_backbone("vit_t", mask_ratio=1e-20)
    with pytest.raises(ValueError, match="drop_path_rate"):
        backbones.get_backbone("vit_t", drop_path_rate=1.0)
    model = backbones.get_backbone("vit_t", embedding_size=8, input_size=36)
    with pytest.raises(ValueError, match="input_size"):
        model(images(size=45))


def test_vit_drop_path_rises_linearly_to_the_variant_rate():
    assert [round(b.drop_path, 6) for b in meta_build("vit_t").blocks] == [
        round(0.1 * i / 11, 6) for i in range(12)
    ]
    assert meta_build("vit_l").blocks[-1].drop_path == pytest.approx(0.05)
    assert meta_build("vit_l").mask_ratio == 0.05 and meta_build("vit_b").mask_ratio == 0.1
