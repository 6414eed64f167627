"""Pretrained weights in (issue 13, point 3): ONNX by graph structure, arcface_torch and
torchvision state dicts, checked on real faces from ``../shared/realfaces``.

The state-dict layouts are built by renaming our keys the way those projects name them:
arcface_torch's ``backbones/iresnet.py`` (github.com/deepinsight/insightface,
recognition/arcface_torch) uses exactly ``backbones.iresnet``'s names, and its DDP-trained
files may carry ``module.``; torchvision's ``models/resnet.py`` uses ``backbones.resnet``'s
names with a 1000-class ``fc``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import backbones
from backbones.export import export_onnx
from backbones.importers import import_onnx, import_weights, write_weights
from launch.import_weights import main as import_main

ort = pytest.importorskip("onnxruntime")

# ../shared/realfaces beside the repository; REALFACES overrides it (e.g. from a git worktree)
REAL = Path(os.environ.get("REALFACES", Path(__file__).resolve().parents[2] / "shared/realfaces"))
MFN_ONNX = REAL / "models" / "mobilefacenet_512.onnx"
needs_real = pytest.mark.skipif(
    not MFN_ONNX.is_file(),
    reason=f"shared real data not found at {REAL.resolve()} (set REALFACES to its folder)",
)


def _faces(n: int | None = None) -> np.ndarray:
    """Real face crops resized to 112x112, RGB, scaled (x/255-0.5)/0.5: ``[N, 3, 112, 112]``."""
    from PIL import Image

    files = sorted((REAL / "crops").glob("*/*.png"))[:n]
    assert files, f"no crops under {REAL / 'crops'}"
    x = np.stack(
        [
            np.asarray(Image.open(f).convert("RGB").resize((112, 112), Image.BILINEAR), np.float32)
            for f in files
        ]
    )
    return ((x / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    batch = sess.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)
    return np.concatenate(
        [sess.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x), step)]
    )


def _embed(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def _numeric_names(src: Path, dst: Path) -> Path:
    """Renames every initializer and intermediate tensor of an ONNX file to a number."""
    model = onnx.load(str(src))
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, str(100 + len(names)))

    for init in graph.initializer:
        init.name = rename(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    del graph.value_info[:]
    onnx.save(model, str(dst))
    return dst


@needs_real
def test_real_mobilefacenet_onnx_matches_onnxruntime_on_real_faces(tmp_path):
    x = _faces()
    start = time.perf_counter()
    out = tmp_path / "mfn.safetensors"
    done = import_main(["--source", str(MFN_ONNX), "--network", "mobilefacenet", "--out", str(out)])
    seconds = time.perf_counter() - start
    model = backbones.get_backbone("mobilefacenet", 512)
    backbones.load_weights(model, out)  # what backbone.init_weights does
    diff = np.abs(_embed(model, x) - _ort(MFN_ONNX, x)).max()
    print(
        f"mobilefacenet_512.onnx: {len(x)} real faces, max |diff| {diff:.2e}, "
        f"import {seconds:.2f} s"
    )
    assert diff < 1e-4
    # every folded BatchNorm was restored: 50 convolutions with a bias, no BN node in the file
    result = done["result"]
    assert len(result.restored_bn) == 50
    assert result.mapped == len(onnx.load(str(MFN_ONNX)).graph.initializer) - 1  # - reshape


@pytest.mark.slow
@needs_real
def test_imported_mobilefacenet_gives_the_onnx_metrics_in_eval(tmp_path):
    """launch/eval.py reads the imported .pt; its metrics equal those of the ONNX model."""
    from PIL import Image

    from eval.cli import main as eval_main

    files = sorted((REAL / "crops").glob("*/*.png"))
    (tmp_path / "img").mkdir()
    for f in files:
        Image.open(f).convert("RGB").resize((112, 112), Image.BILINEAR).save(
            tmp_path / "img" / f.name
        )
    people = [f.parent.name for f in files]
    lines = ["label,path1,path2"]
    for i in range(len(files)):
        for j in range(i + 1, len(files)):
            if people[i] == people[j] or (i + j) % 7 == 0:
                lines.append(
                    f"{int(people[i] == people[j])},img/{files[i].name},img/{files[j].name}"
                )
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mfn.pt"
    import_main(["--source", str(MFN_ONNX), "--network", "mobilefacenet", "--out", str(out)])
    res = {}
    for weights in (MFN_ONNX, out):
        args = ["--weights", str(weights), "--network", "mobilefacenet", "--targets", str(pairs)]
        res[weights.suffix] = eval_main([*args, "--no-plots", "--batch-size", "1"])["pairs"]
    onnx_m, pt_m = res[".onnx"].metrics, res[".pt"].metrics
    print(f"crops pairs: ONNX {onnx_m['accuracy']:.4f}, imported {pt_m['accuracy']:.4f}")
    assert abs(onnx_m["accuracy"] - pt_m["accuracy"]) <= 0.002
    assert np.abs(res[".onnx"].scores - res[".pt"].scores).max() < 1e-4


@needs_real
@pytest.mark.parametrize("network", ["iresnet18", "resnet34"])
def test_own_onnx_export_round_trips_through_the_structural_mapper(tmp_path, network):
    torch.manual_seed(0)
    source = backbones.get_backbone(network, 512).eval()
    with torch.no_grad():  # non-trivial statistics, so a wrong BatchNorm mapping shows
        for m in source.modules():
            if isinstance(m, torch.nn.Conv2d):  # unit-scale activations, as in a trained net
                m.weight.normal_(0.0, (m.weight[0].numel()) ** -0.5)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    onnx_path = _numeric_names(export_onnx(source, tmp_path / "a.onnx"), tmp_path / "n.onnx")
    names = [i.name for i in onnx.load(str(onnx_path)).graph.initializer]
    assert all(n.isdigit() for n in names)
    x = _faces(8)
    result = import_weights(onnx_path, network)
    ref = _ort(onnx_path, x)
    diff = np.abs(_embed(result.model, x) - ref).max()
    print(f"{network}: own ONNX round trip, max |diff| {diff:.2e} (scale {np.abs(ref).max():.2f})")
    assert 0.1 < np.abs(ref).max() < 100
    assert diff < 1e-4
    assert np.abs(_embed(result.model, x) - _embed(source, x)).max() < 1e-4


def test_architecture_mismatch_names_the_first_tensor(tmp_path):
    source = backbones.get_backbone("iresnet18", 512, width_mult=0.25, input_size=32)
    onnx_path = export_onnx(source, tmp_path / "small.onnx", input_size=(32, 32))
    with pytest.raises(ValueError) as err:
        import_weights(onnx_path, "iresnet18", input_size=(32, 32))
    msg = str(err.value)
    graph = onnx.load(str(onnx_path)).graph
    conv = next(n for n in graph.node if n.op_type == "Conv")
    first = next(i for i in graph.initializer if i.name == conv.input[1])
    shape = tuple(numpy_helper.to_array(first).shape)
    assert f"ONNX initializer {first.name!r} {shape}" in msg
    assert "does not fit conv1.weight (64, 3, 3, 3)" in msg
    # a wrong family fails on a kind mismatch, still naming the tensor and the module
    with pytest.raises(ValueError, match=r"ONNX initializer .* does not fit"):
        import_weights(onnx_path, "mobilefacenet", input_size=(32, 32))


@needs_real
def test_real_onnx_into_a_wrong_embedding_size_names_the_tensor():
    with pytest.raises(
        ValueError,
        match=r"ONNX initializer '\d+' \(512, 512, 1, 1\).*linear\.weight \(128, 512, 1, 1\)",
    ):
        import_weights(MFN_ONNX, "mobilefacenet", embedding_size=128)


def _randomised(network: str) -> torch.nn.Module:
    torch.manual_seed(1)
    model = backbones.get_backbone(network, 512).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@needs_real
def test_arcface_torch_state_dict_loads_exactly(tmp_path, capsys):
    source = _randomised("iresnet18")
    # arcface_torch's names are ours; a DDP save adds "module.", older saves lack
    # num_batches_tracked
    state = {f"module.{k}": v for k, v in source.state_dict().items() if "num_batches" not in k}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    out = tmp_path / "r18.pt"
    import_main(["--source", str(path), "--network", "iresnet18", "--out", str(out)])
    model = backbones.get_backbone("iresnet18", 512)
    backbones.load_weights(model, out)
    x = _faces(4)
    assert np.array_equal(_embed(model, x), _embed(source, x))
    state["module.fc.weight"] = state["module.fc.weight"][:256]
    torch.save(state, path)
    with pytest.raises(SystemExit) as exit_info:
        import_main(["--source", str(path), "--network", "iresnet18", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "key 'fc.weight' (256, 25088) does not fit fc.weight (512, 25088)" in err


@needs_real
def test_torchvision_state_dict_loads_the_trunk_exactly(tmp_path):
    source = _randomised("resnet34")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("features.")}
    state["fc.weight"] = torch.randn(1000, 512)  # ImageNet's classifier
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet34-imagenet.pth"
    torch.save(state, path)
    result = import_weights(path, "resnet34")
    assert sorted(result.not_imported) == sorted(
        k for k in result.model.state_dict() if k.startswith(("fc.", "features."))
    )
    got, want = result.model.state_dict(), source.state_dict()
    for key in want:
        if not key.startswith(("fc.", "features.")):
            assert torch.equal(got[key], want[key]), key
    # the trunk computes the same features as the source
    x = torch.from_numpy(_faces(2))
    with torch.no_grad():
        trunk = lambda m: m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(m._stem(x))))))  # noqa: E731
        assert torch.equal(trunk(result.model), trunk(source))
    out = write_weights(result.model, tmp_path / "r34.safetensors")
    backbones.load_weights(backbones.get_backbone("resnet34", 512), out)
    del state["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match="model key 'layer1.0.conv1.weight' .* is missing"):
        import_weights(state, "resnet34", kind="torchvision")


def test_onnx_with_batchnorm_nodes_and_a_conv_bias_in_front(tmp_path):
    """An unfolded graph (BatchNormalization nodes kept) maps BN to BN; a conv bias in front of
    a kept BatchNorm is moved into that BatchNorm's running_mean."""
    torch.manual_seed(2)
    source = backbones.get_backbone("mobilefacenet", 64, width_mult=0.25, input_size=32).eval()
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "bn.onnx"
    with torch.no_grad():
        torch.onnx.export(
            source,
            (torch.randn(1, 3, 32, 32),),
            str(path),
            input_names=["images"],
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    kinds = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" in kinds
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 2
    weight = next(i for i in model.graph.initializer if i.name == conv.input[1])
    channels = weight.dims[0]
    bias = np.random.default_rng(0).normal(0, 5.0, channels).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(bias, "extra_bias"))
    conv.input.append("extra_bias")
    onnx.save(model, str(path))
    target = backbones.get_backbone("mobilefacenet", 64, width_mult=0.25, input_size=32)
    result = import_onnx(path, target, input_size=(32, 32))
    assert result.restored_bn == []
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    ref = _ort(path, x)
    assert np.abs(_embed(source, x) - ref).max() > 1e-3  # the bias matters
    shifted = source.stem[0][1].running_mean - torch.from_numpy(bias)
    assert torch.allclose(result.model.stem[0][1].running_mean, shifted)
    assert np.abs(_embed(result.model, x) - ref).max() < 1e-4
