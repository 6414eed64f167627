"""Exporting a trained backbone for deployment and sharing: ONNX, TorchScript, safetensors.

Owns the export formats and their round-trip checks. Does not own reading weights back into
PyTorch (``backbones.weights``) nor evaluation.

* ONNX: opset 17 by default, input ``images [N, 3, H, W]`` float32 (normalised as in training),
  output ``embeddings [N, D]`` float32, the batch axis dynamic. Exported with PyTorch's
  TorchScript-based exporter (``dynamo=False``), which needs only the ``onnx`` package; the
  newer dynamo exporter would also need ``onnxscript``.
* TorchScript: ``torch.jit.trace`` of the eval-mode network (fixed H, W; any batch). PyTorch
  2.13 marks TorchScript deprecated in favour of ``torch.export``; it is kept because C++ and
  older deployment stacks still load it.
* safetensors: the state dict without pickle, with ``network`` and ``embedding_size`` in the
  header metadata, loadable by ``backbones.load_weights``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from backbones.weights import save_safetensors

FORMATS = ("onnx", "safetensors", "torchscript")


def _example(input_size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(0))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_size: tuple[int, int] = (112, 112),
    opset: int = 17,
) -> Path:
    """Writes ``model`` (put in eval mode, on CPU) as ONNX with a dynamic batch axis.

    Args:
        model: a backbone.
        path: the ``.onnx`` file to write.
        input_size: (H, W) the graph is traced at; H and W stay fixed in the graph.
        opset: ONNX opset, at least 17.

    Returns:
        ``path`` as a ``Path``.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    model = model.eval().cpu()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about the shape check in forward(); the check is constant-folded away.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The legacy exporter is chosen on purpose (see the module docstring); its deprecation
        # notice would only alarm users of the CLI.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (_example(input_size),),
            str(path),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def export_torchscript(
    model: nn.Module, path: str | os.PathLike[str], input_size: tuple[int, int] = (112, 112)
) -> Path:
    """Writes a traced TorchScript module (eval mode, CPU); load with ``torch.jit.load``."""
    path = Path(path)
    model = model.eval().cpu()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(model, _example(input_size), check_trace=False)
    traced.save(str(path))
    return path


def export_safetensors(
    model: nn.Module, path: str | os.PathLike[str], network: str, embedding_size: int
) -> Path:
    """Writes the state dict as safetensors with the network name and D in the metadata."""
    path = Path(path)
    save_safetensors(model, path, {"network": network, "embedding_size": str(embedding_size)})
    return path


def onnx_max_abs_diff(
    model: nn.Module, onnx_path: str | os.PathLike[str], batch_sizes: tuple[int, ...] = (1, 3)
) -> float:
    """Largest |PyTorch - onnxruntime| over random inputs of several batch sizes.

    The batch sizes differ from the one traced at, so this also checks the dynamic batch axis.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape  # ["batch", 3, H, W]
    model = model.eval().cpu()
    worst = 0.0
    for i, batch in enumerate(batch_sizes):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(batch, 3, int(shape[2]), int(shape[3]), generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = session.run(["embeddings"], {"images": x.numpy()})
        if got.shape != ref.shape:
            raise AssertionError(f"{onnx_path}: output {got.shape}, expected {ref.shape}")
        worst = max(worst, float(abs(got - ref).max()))
    return worst


def export(
    weights: str | os.PathLike[str],
    network: str,
    fmt: str,
    out: str | os.PathLike[str],
    embedding_size: int = 512,
    input_size: tuple[int, int] = (112, 112),
    check: bool = True,
) -> dict[str, object]:
    """Builds ``network``, loads ``weights`` into it and writes it to ``out`` as ``fmt``.

    Args:
        weights: any file ``backbones.load_weights`` accepts (state dict, training checkpoint,
            safetensors).
        network: registry name.
        fmt: "onnx", "safetensors" or "torchscript".
        out: the file to write.
        embedding_size: D the weights were trained with.
        input_size: (H, W) for ONNX/TorchScript tracing and for networks whose layers depend on
            it (iresnet, mobilefacenet, vit).
        check: compare the written file against PyTorch (onnxruntime for ONNX, a reload for
            the others) and put the largest absolute difference in the result.

    Returns:
        ``{"path": Path, "max_abs_diff": float | None}``.
    """
    import backbones

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    kwargs: dict[str, object] = {}
    if "input_size" in (backbones.BACKBONES.keywords(network) or {}):
        kwargs["input_size"] = tuple(input_size)
    model = backbones.get_backbone(network, embedding_size=embedding_size, **kwargs)
    backbones.load_weights(model, weights)
    model.eval()
    diff: float | None = None
    if fmt == "onnx":
        path = export_onnx(model, out, input_size)
        if check:
            diff = onnx_max_abs_diff(model, path)
    elif fmt == "torchscript":
        path = export_torchscript(model, out, input_size)
        if check:
            x = _example(input_size, batch=3)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                diff = float((torch.jit.load(str(path))(x) - model(x)).abs().max())
    else:
        path = export_safetensors(model, out, network, embedding_size)
        if check:
            again = backbones.get_backbone(network, embedding_size=embedding_size, **kwargs)
            backbones.load_weights(again, path)
            ref, got = model.state_dict(), again.state_dict()
            diff = max(float((ref[k].double() - got[k].double()).abs().max()) for k in ref)
    return {"path": path, "max_abs_diff": diff}
