"""Export round trips: ONNX against onnxruntime (dynamic batch), TorchScript, safetensors, and
the launch/export.py and launch/model_info.py entry points."""

from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch
from torch import nn

import backbones
from backbones.export import export_onnx, onnx_max_abs_diff
from backbones.info import model_info
from launch.export import main as export_main
from launch.model_info import main as info_main

FAMILY_REPS = ["iresnet18", "thin_resnet34", "resnet34", "efficientnet_b0", "mobilefacenet"]


def trained_like(name: str, size: int, embedding_size: int = 16, seed: int = 0) -> nn.Module:
    """An eval-mode network with the conditioning of a trained one.

    Raw initialisation is no stand-in: iresnet's N(0, 0.1) convolutions give outputs near 1e7
    in eval mode, where an absolute tolerance means nothing, and at initialisation a ResNet's
    residual stream grows stage after stage, so random inputs give nearly the same features
    and the final BatchNorm amplifies the rounding of their tiny differences (5e-5 in PyTorch
    fp32 itself against float64). So, as in trained networks, each residual branch ends with a
    small BatchNorm scale; BatchNorm statistics are estimated on random batches; variances are
    floored; and the output is scaled to unit spread.
    """
    torch.manual_seed(seed)
    kwargs = {"input_size": size} if name.startswith(("iresnet", "mobilefacenet")) else {}
    model = backbones.get_backbone(name, embedding_size=embedding_size, **kwargs)
    with torch.no_grad():
        for block in model.modules():
            if hasattr(block, "downsample"):  # a residual block of any ResNet family
                last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
                last_bn.weight.fill_(0.2)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
        for m in norms:
            m.running_var.clamp_(min=0.1)
        model.eval()
        spread = model(torch.randn(8, 3, size, size)).std()
        last = model.features if hasattr(model, "features") else model.fc
        last.weight.div_(spread)
        last.bias.div_(spread)
    return model


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_onnx_matches_pytorch_with_dynamic_batch(name, tmp_path):
    size = 32
    model = trained_like(name, size)
    path = export_onnx(model, tmp_path / f"{name}.onnx", (size, size))
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic, not fixed
    with torch.no_grad():
        assert 0.3 < model(torch.randn(3, 3, size, size)).std() < 3  # a meaningful scale
    assert onnx_max_abs_diff(model, path, batch_sizes=(1, 3, 5)) <= 1e-4


@pytest.mark.slow
def test_onnx_iresnet50_full_size(tmp_path):
    model = trained_like("iresnet50", 112, embedding_size=512)
    path = export_onnx(model, tmp_path / "r50.onnx")
    assert onnx_max_abs_diff(model, path, batch_sizes=(1, 2)) <= 1e-4


def test_onnx_rejects_old_opset(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(trained_like("mobilefacenet", 16), tmp_path / "m.onnx", (16, 16), opset=13)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors", "torchscript"])
def test_export_cli_round_trip(fmt, tmp_path, capsys):
    model = trained_like("mobilefacenet", 32, embedding_size=32)
    weights = tmp_path / "model.pt"
    # A training checkpoint, as the trainer writes it, is accepted as --weights.
    torch.save({"backbone": model.state_dict(), "step": 3}, weights)
    out = tmp_path / f"exported.{fmt}"
    result = export_main(
        [
            "--weights", str(weights), "--network", "mobilefacenet", "--embedding-size", "32",
            "--input-size", "32", "32", "--format", fmt, "--out", str(out),
        ]
    )  # fmt: skip
    assert out.is_file() and result["max_abs_diff"] <= 1e-4
    assert "max |PyTorch - exported|" in capsys.readouterr().out
    if fmt == "safetensors":
        # safetensors layout: u64 header length, a JSON header, raw tensor bytes (no pickle).
        raw = out.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert header["__metadata__"] == {"network": "mobilefacenet", "embedding_size": "32"}
        assert header["linear.weight"]["dtype"] == "F32"
        fresh = backbones.get_backbone("mobilefacenet", embedding_size=32, input_size=32)
        backbones.load_weights(fresh, out)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)
    if fmt == "torchscript":
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit in 2.13
            torch.testing.assert_close(torch.jit.load(str(out))(x), model(x))


def test_export_cli_wrong_network_is_a_clear_error(tmp_path):
    weights = tmp_path / "model.pt"
    torch.save(trained_like("mobilefacenet", 32, embedding_size=32).state_dict(), weights)
    with pytest.raises(ValueError, match=r"model\.pt.*embedding-size"):
        export_main(
            ["--weights", str(weights), "--network", "mobilefacenet", "--format", "onnx",
             "--input-size", "32", "32", "--out", str(tmp_path / "x.onnx")]
        )  # fmt: skip


def test_model_info_counts_known_figures():
    # InsightFace lists iresnet50 at 6.3 GFLOPs (conv+linear MACs) and MobileFaceNet's paper
    # 221M MACs at 128-d.
    r50 = model_info("iresnet50")
    assert r50.params == 43_590_848 and round(r50.macs / 1e9, 1) == 6.3
    mbf = model_info("mobilefacenet", embedding_size=128)
    assert round(mbf.macs / 1e6) == 221
    # By hand: the embedding layer is 512 x 7 x 7 -> 512.
    assert r50.by_kind["linear"] == 512 * 49 * 512 + 512
    # torchvision lists ResNet-50 at 4.09 GFLOPs (MACs) at 224x224; the 2048 -> 512 head
    # instead of 2048 -> 1000 changes that by 1M.
    assert round(model_info("resnet50", input_size=(224, 224)).macs / 1e9, 2) == 4.09


@pytest.mark.slow
def test_model_info_cli_lists_every_backbone(capsys):
    info_main(["--list"])
    out = capsys.readouterr().out
    for name in backbones.names():
        assert name in out
    assert "43,590,848" in out  # iresnet50


def test_model_info_cli_one_network(capsys):
    info_main(["thin_resnet50", "--input-size", "160", "160", "--embedding-size", "256"])
    out = capsys.readouterr().out
    assert "160x160" in out and "conv" in out and "256" in out
    info_main(["iresnet18", "--param", "width_mult=0.25"])
    assert "3,914,752" in capsys.readouterr().out  # widths 16/32/64/128, FC 128*49 -> 512
    with pytest.raises(SystemExit):
        info_main(["not_a_net"])
    with pytest.raises(SystemExit):
        info_main(["iresnet18", "--param", "no_such_kw=1"])


def vit_trained_like(size: int, embedding_size: int = 16) -> nn.Module:
    """An eval-mode vit_t with estimated BatchNorm statistics and unit output spread (see
    ``trained_like``; a ViT has no residual BatchNorm to damp)."""
    torch.manual_seed(0)
    model = backbones.get_backbone("vit_t", embedding_size=embedding_size, input_size=size)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
        model.eval()
        last = model.feature[-1]
        spread = model(torch.randn(8, 3, size, size)).std()
        last.weight.div_(spread)
        last.bias.div_(spread)
    return model


@pytest.mark.parametrize(
    "size,embedding_size",
    [(36, 16), pytest.param(112, 512, marks=pytest.mark.slow)],
)
def test_onnx_vit_matches_pytorch_with_dynamic_batch(size, embedding_size, tmp_path):
    model = vit_trained_like(size, embedding_size)
    path = export_onnx(model, tmp_path / "vit_t.onnx", (size, size))
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    # eval mode: no masking, so no random op in the graph
    assert not {n.op_type for n in graph.graph.node} & {"RandomUniformLike", "RandomUniform"}
    with torch.no_grad():
        assert 0.3 < model(torch.randn(3, 3, size, size)).std() < 3
    assert onnx_max_abs_diff(model, path, batch_sizes=(1, 3)) <= 1e-4


def test_model_info_counts_vit_as_arcface_torch():
    # arcface_torch names them ViT-T-1.5G and ViT-B-11G: conv + linear + attention MACs.
    vit_t, vit_b = model_info("vit_t"), model_info("vit_b")
    assert vit_t.params == 19_137_792 and round(vit_t.macs / 1e9, 1) == 1.5
    assert vit_b.params == 113_833_472 and round(vit_b.macs / 1e9) == 11
    # q k^T and attn v: 2 * N^2 * D per block (arcface_torch's extra_gflops), N = 144 patches.
    assert vit_t.by_kind["attention"] == 12 * 2 * 144**2 * 256
    assert vit_t.macs == vit_t.by_kind["conv"] + vit_t.by_kind["linear"] + 12 * 2 * 144**2 * 256
    # 9x9x3 patch convolution with bias, 144 outputs of 256 channels
    assert vit_t.by_kind["conv"] == 144 * 256 * (243 + 1)
    # LayerNorms count as norm: 2 per block and the final one, 144 x 256 each
    assert vit_t.by_kind["norm"] == 25 * 144 * 256 + 256 + 512
    assert model_info("iresnet50").by_kind["attention"] == 0
