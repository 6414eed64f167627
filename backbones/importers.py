"""Importing pretrained weights from other frameworks into a registered backbone.

Owns the three mappings ``launch/import_weights.py`` offers, each producing a backbone of this
project whose eval-mode embeddings equal the source's:

* ONNX (:func:`import_onnx`): mapped by graph structure, not by tensor names (exported models
  often name their tensors ``"518"``, ``"521"``, ...). The graph's parameterised ops (``Conv``
  with its weight/bias, ``PRelu``, ``Gemm``, ``MatMul`` [+ ``Add``], ``BatchNormalization``)
  are taken in the file's node order (ONNX requires it to be topological) and matched one by
  one to the network's parameterised leaf modules (``Conv2d``, ``Linear``, ``PReLU``,
  ``BatchNorm1d/2d``) in the order a forward pass calls them, checking every shape. A
  convolution or linear layer whose BatchNorm was folded into it (a bias in ONNX, no
  ``BatchNormalization`` node, while our layer is bias-free and followed by a BatchNorm)
  is restored exactly: the BatchNorm gets identity statistics (``running_mean`` 0,
  ``running_var`` chosen so that ``running_var + eps`` is exactly 1.0 in float32, weight 1)
  and the folded bias as its bias, so eval outputs are unchanged. A bias in front of a
  BatchNorm that the graph did keep goes into that BatchNorm's ``running_mean``.
* InsightFace ``arcface_torch`` iResNet state dicts (:func:`import_arcface_torch`): the
  layout of arcface_torch's ``backbones/iresnet.py`` (``conv1, bn1, prelu, layerN.M.{bn1,
  conv1, bn2, prelu, conv2, bn3, downsample.0, downsample.1}, bn2, fc, features``) is the
  layout of ``backbones.iresnet``; the importer strips the wrapper prefixes that saved files
  carry (``module.`` from DDP, ``backbone.``) and fills ``num_batches_tracked`` when absent.
* torchvision ResNet state dicts (:func:`import_torchvision`): ``backbones.resnet`` uses
  torchvision's layout; ImageNet's 1000-class ``fc`` is dropped and the embedding head
  (``fc``, ``features``) stays freshly initialised (seeded), which the result says.

A network that does not fit raises ``ValueError`` naming the first tensor that does not fit
(the source's name and shape next to the module's name and shape). Does not own the weights
file formats (``backbones.weights``) nor ONNX export (``backbones.export``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from backbones.weights import read_state_dict, save_safetensors

SOURCES = ("onnx", "arcface_torch", "torchvision")
_PARAM_MODULES = (nn.Conv2d, nn.Linear, nn.PReLU, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class ImportResult:
    """What an import did."""

    model: nn.Module
    """The backbone (eval mode, CPU) holding the imported weights."""
    source: str
    """One of ``SOURCES``."""
    mapped: int
    """Source tensors (ONNX initializers or state-dict entries) copied into the model."""
    restored_bn: list[str] = field(default_factory=list)
    """BatchNorm modules given identity statistics because ONNX had them folded."""
    not_imported: list[str] = field(default_factory=list)
    """Model keys left at their initial values (torchvision's embedding head)."""
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# ONNX


@dataclass
class _OnnxOp:
    kind: str  # "conv", "prelu", "linear", "bn"
    node: str  # a readable node description for errors
    output: str
    inputs: list[str]
    tensors: dict[str, tuple[str, Tensor]]  # role -> (initializer name, tensor)
    eps: float = 1e-5
    attrs: dict = field(default_factory=dict)


def _onnx_ops(path: Path) -> list[_OnnxOp]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    consts = {}  # Constant nodes carry weights in some exports
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t

    alias = {}  # Identity nodes the exporter puts on shared (deduplicated) initializers
    for node in graph.node:
        if node.op_type == "Identity":
            alias[node.output[0]] = node.input[0]

    def tensor(name: str) -> tuple[str, Tensor] | None:
        while name not in inits and name not in consts and name in alias:
            name = alias[name]
        proto = inits.get(name) or consts.get(name)
        if proto is None:
            return None
        return name, torch.from_numpy(numpy_helper.to_array(proto).copy())

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ops: list[_OnnxOp] = []
    absorbed: set[int] = set()
    for node in graph.node:
        if id(node) in absorbed:
            continue
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        params = {i: tensor(name) for i, name in enumerate(node.input)}
        params = {i: t for i, t in params.items() if t is not None}
        if node.op_type == "Conv":
            if 1 not in params:
                raise ValueError(f"{path}: {label}: its weight is not a constant initializer")
            found = {"weight": params[1]}
            if 2 in params:
                found["bias"] = params[2]
            ops.append(_OnnxOp("conv", label, node.output[0], list(node.input), found, attrs=attrs))
        elif node.op_type == "PRelu":
            if 1 not in params:
                raise ValueError(f"{path}: {label}: its slope is not a constant initializer")
            ops.append(
                _OnnxOp("prelu", label, node.output[0], list(node.input), {"weight": params[1]})
            )
        elif node.op_type == "Gemm":
            if 1 not in params:
                raise ValueError(f"{path}: {label}: its weight is not a constant initializer")
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                raise ValueError(f"{path}: {label}: transA/alpha are not supported")
            name, weight = params[1]
            if not attrs.get("transB", 0):
                weight = weight.t().contiguous()
            found = {"weight": (name, weight)}
            if 2 in params:
                bname, bias = params[2]
                found["bias"] = (bname, bias * attrs.get("beta", 1.0))
            ops.append(_OnnxOp("linear", label, node.output[0], list(node.input), found))
        elif node.op_type == "MatMul" and 1 in params:
            name, weight = params[1]
            found = {"weight": (name, weight.t().contiguous())}
            output = node.output[0]
            adds = [n for n in consumers.get(output, []) if n.op_type == "Add"]
            if len(consumers.get(output, [])) == 1 and adds:
                bias = tensor(next(x for x in adds[0].input if x != output))
                if bias is not None:
                    found["bias"] = bias
                    absorbed.add(id(adds[0]))
                    output = adds[0].output[0]
            ops.append(_OnnxOp("linear", label, output, list(node.input), found))
        elif node.op_type == "BatchNormalization":
            roles = ("weight", "bias", "running_mean", "running_var")
            missing = [r for i, r in enumerate(roles, 1) if i not in params]
            if missing:
                raise ValueError(f"{path}: {label}: {missing} are not constant initializers")
            found = {r: params[i] for i, r in enumerate(roles, 1)}
            ops.append(
                _OnnxOp(
                    "bn",
                    label,
                    node.output[0],
                    list(node.input),
                    found,
                    eps=float(attrs.get("epsilon", 1e-5)),
                )
            )
    return ops


@dataclass
class _Call:
    name: str
    module: nn.Module
    input: Tensor
    output: Tensor


def _module_calls(model: nn.Module, input_size: tuple[int, int]) -> list[_Call]:
    """The parameterised leaf modules in the order one eval forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[_Call] = []
    hooks = []

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        calls.append(_Call(names[module], module, args[0], output))

    for module in names:
        if isinstance(module, _PARAM_MODULES):
            hooks.append(module.register_forward_hook(hook))
        elif not list(module.children()) and (
            list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))
        ):
            raise ValueError(
                f"module {names[module]!r} ({type(module).__name__}) has parameters the ONNX "
                "importer cannot map"
            )
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
    finally:
        for h in hooks:
            h.remove()
    seen: set[int] = set()
    unique = []
    for call in calls:
        if id(call.module) in seen:
            raise ValueError(f"module {call.name!r} is called twice; cannot map by structure")
        seen.add(id(call.module))
        unique.append(call)
    for module, name in names.items():
        if isinstance(module, _PARAM_MODULES) and id(module) not in seen:
            raise ValueError(f"module {name!r} is not used by forward(); cannot map by structure")
    return unique


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _misfit(path: Path, op: _OnnxOp, role: str, module: str, key: str, want: Tensor) -> str:
    name, value = op.tensors[role]
    return (
        f"{path}: ONNX initializer {name!r} {_shape(value)} ({op.node}, {role}) does not fit "
        f"{module}.{key} {_shape(want)}"
    )


def _check_conv(path: Path, op: _OnnxOp, call: _Call) -> None:
    """Stride, groups and padding must agree too (the weight shape does not show them)."""
    mod = call.module
    got = {
        "strides": tuple(op.attrs.get("strides", (1, 1))),
        "group": int(op.attrs.get("group", 1)),
        "dilations": tuple(op.attrs.get("dilations", (1, 1))),
    }
    want = {"strides": tuple(mod.stride), "group": mod.groups, "dilations": tuple(mod.dilation)}
    pads = op.attrs.get("pads")
    if pads is not None and isinstance(mod.padding, tuple):
        got["pads"] = tuple(pads)
        want["pads"] = tuple(mod.padding) * 2
    if got != want:
        name, value = op.tensors["weight"]
        raise ValueError(
            f"{path}: ONNX initializer {name!r} {_shape(value)} ({op.node}) has {got} but "
            f"{call.name} has {want}"
        )


def _identity_var(eps: float) -> float:
    """A float32 variance ``v`` with ``float32(v + eps) == 1.0`` exactly."""
    one = torch.tensor(1.0, dtype=torch.float32)
    var = torch.tensor(1.0 - eps, dtype=torch.float32)
    for _ in range(64):
        total = var + torch.tensor(eps, dtype=torch.float32)
        if total == one:
            return float(var)
        var = torch.nextafter(var, -total + 2 * one)
    raise ValueError(f"no float32 variance gives var + eps == 1 for eps={eps}")


def _set_identity_bn(bn: nn.Module, bias: Tensor) -> None:
    bn.running_mean.zero_()
    bn.running_var.fill_(_identity_var(bn.eps))
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is None:
        raise ValueError(f"{bn}: no affine bias to hold the folded bias")
    bn.bias.copy_(bias)


def _copy(path: Path, op: _OnnxOp, role: str, call: _Call, key: str, reshape: bool = False) -> None:
    target = getattr(call.module, key)
    value = op.tensors[role][1]
    if reshape and value.numel() == target.numel():
        value = value.reshape(target.shape)
    if _shape(value) != _shape(target):
        raise ValueError(_misfit(path, op, role, call.name, key, target))
    target.copy_(value.to(target.dtype))


def import_onnx(
    path: str | os.PathLike[str], model: nn.Module, input_size: tuple[int, int] = (112, 112)
) -> ImportResult:
    """Copies an ONNX model's weights into ``model`` by graph structure (see module docstring).

    Raises:
        ValueError: the architectures differ; the message names the first ONNX initializer
            (name, shape, node) and the module key (name, shape) that do not fit, or the first
            op or module left over.
    """
    start = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    ops = _onnx_ops(path)
    model = model.eval().cpu()
    calls = _module_calls(model, input_size)
    restored: list[str] = []
    mapped = 0
    i = j = 0
    with torch.no_grad():
        while i < len(ops) and j < len(calls):
            op, call = ops[i], calls[j]
            mod = call.module
            want = next(
                kind
                for cls, kind in (
                    (nn.Conv2d, "conv"),
                    (nn.Linear, "linear"),
                    (nn.PReLU, "prelu"),
                    (nn.modules.batchnorm._BatchNorm, "bn"),
                )
                if isinstance(mod, cls)
            )
            if op.kind != want:
                first = next(iter(op.tensors.values()))
                raise ValueError(
                    f"{path}: ONNX initializer {first[0]!r} {_shape(first[1])} ({op.node}) "
                    f"does not fit {call.name} ({type(mod).__name__}, weight "
                    f"{_shape(mod.weight) if mod.weight is not None else None})"
                )
            if op.kind == "prelu":
                _copy(path, op, "weight", call, "weight", reshape=True)
                mapped += 1
            elif op.kind == "bn":
                if mod.weight is None or mod.running_mean is None:
                    raise ValueError(f"{path}: {call.name} is not an affine, tracking BatchNorm")
                for role in ("weight", "bias", "running_mean", "running_var"):
                    _copy(path, op, role, call, role)
                mapped += 4
                if abs(op.eps - mod.eps) > 1e-12:
                    # Keep the ONNX arithmetic: var + eps must stay the same.
                    mod.running_var.add_(op.eps - mod.eps)
            else:  # conv / linear
                _copy(path, op, "weight", call, "weight")
                if op.kind == "conv":
                    _check_conv(path, op, call)
                mapped += 1
                if "bias" in op.tensors:
                    mapped += 1
                    if mod.bias is not None:
                        _copy(path, op, "bias", call, "bias")
                    else:
                        bias = op.tensors["bias"][1]
                        nxt = calls[j + 1] if j + 1 < len(calls) else None
                        if (
                            nxt is None
                            or not isinstance(nxt.module, nn.modules.batchnorm._BatchNorm)
                            or nxt.input.data_ptr() != call.output.data_ptr()
                            or nxt.module.num_features != bias.numel()
                        ):
                            raise ValueError(
                                f"{path}: ONNX initializer {op.tensors['bias'][0]!r} "
                                f"{_shape(bias)} ({op.node}, bias) does not fit: {call.name} "
                                "has no bias and no BatchNorm directly after it"
                            )
                        bn_op = ops[i + 1] if i + 1 < len(ops) else None
                        if bn_op is not None and bn_op.kind == "bn" and op.output in bn_op.inputs:
                            # The graph kept the BatchNorm: the bias shifts its mean.
                            i += 1
                            j += 1
                            for role in ("weight", "bias", "running_mean", "running_var"):
                                _copy(path, bn_op, role, nxt, role)
                            mapped += 4
                            nxt.module.running_mean.sub_(bias.to(nxt.module.running_mean.dtype))
                            if abs(bn_op.eps - nxt.module.eps) > 1e-12:
                                nxt.module.running_var.add_(bn_op.eps - nxt.module.eps)
                        else:
                            _set_identity_bn(nxt.module, bias.to(nxt.module.bias.dtype))
                            restored.append(nxt.name)
                            j += 1
                elif mod.bias is not None:
                    mod.bias.zero_()
            i += 1
            j += 1
    if i < len(ops):
        op = ops[i]
        first = next(iter(op.tensors.values()))
        raise ValueError(
            f"{path}: ONNX initializer {first[0]!r} {_shape(first[1])} ({op.node}) is left over: "
            f"{type(model).__name__} has no more parameterised modules"
        )
    if j < len(calls):
        call = calls[j]
        raise ValueError(
            f"{path}: the ONNX graph has no more parameterised ops for {call.name} "
            f"({type(call.module).__name__}, weight {_shape(call.module.weight)})"
        )
    return ImportResult(
        model, "onnx", mapped, restored_bn=restored, seconds=time.perf_counter() - start
    )


# ---------------------------------------------------------------------------------------------
# State dicts


_ARCFACE_PREFIXES = ("module.", "backbone.")


def _load_state(source: str | os.PathLike[str] | dict[str, Tensor]) -> tuple[str, dict]:
    if isinstance(source, dict):
        return "<dict>", dict(source)
    return str(source), read_state_dict(source)


def import_arcface_torch(
    source: str | os.PathLike[str] | dict[str, Tensor], model: nn.Module
) -> ImportResult:
    """Loads an arcface_torch iResNet state dict (``backbone.pth``) into an ``iresnet*`` model.

    The key layout is arcface_torch's ``backbones/iresnet.py`` (the same as
    ``backbones.iresnet``); ``module.``/``backbone.`` prefixes are stripped and missing
    ``num_batches_tracked`` buffers are filled with 0. Any other missing, extra or mis-shaped
    key raises, naming the first.
    """
    start = time.perf_counter()
    name, state = _load_state(source)
    clean = {}
    for key, value in state.items():
        for prefix in _ARCFACE_PREFIXES:
            key = key.removeprefix(prefix)
        clean[key] = value
    _check_keys(
        name, model, clean, place_hint=" (wrong --network?)",
        fit_hint="wrong --network or --embedding-size?",
    )  # fmt: skip
    model.load_state_dict(clean)
    mapped = sum(1 for k in state if not k.endswith("num_batches_tracked"))
    return ImportResult(model.eval(), "arcface_torch", mapped, seconds=time.perf_counter() - start)


def _check_keys(
    name: str,
    model: nn.Module,
    state: dict[str, Tensor],
    *,
    skip: tuple[str, ...] = (),
    place_hint: str = "",
    fit_hint: str,
) -> None:
    """Checks a state dict against ``model``'s keys and shapes (keys starting with ``skip`` stay
    as initialised); adds the zero ``num_batches_tracked`` counters the source lacks. The first
    unknown, misshapen or missing key raises, naming the file."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own or key.startswith(skip):
            raise ValueError(
                f"{name}: key {key!r} {_shape(value)} has no place in "
                f"{type(model).__name__}{place_hint}"
            )
        if _shape(value) != _shape(own[key]):
            raise ValueError(
                f"{name}: key {key!r} {_shape(value)} does not fit {key} {_shape(own[key])} "
                f"({fit_hint})"
            )
    for key in own:
        if key not in state and not key.startswith(skip):
            if key.endswith("num_batches_tracked"):
                state[key] = torch.zeros_like(own[key])
            else:
                raise ValueError(f"{name}: model key {key!r} {_shape(own[key])} is missing")


def import_torchvision(
    source: str | os.PathLike[str] | dict[str, Tensor], model: nn.Module
) -> ImportResult:
    """Loads a torchvision ResNet state dict into a ``resnet34``/``resnet50`` model.

    Every backbone key must be present with its shape (the first that is not raises); the
    1000-class ``fc`` is dropped and ``fc``/``features`` stay as initialised (listed in
    ``not_imported``): the embedding head has to be trained.
    """
    start = time.perf_counter()
    name, state = _load_state(source)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head = ("fc.", "features.")
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    _check_keys(name, model, body, skip=head, fit_hint="wrong --network?")
    model.load_state_dict(body, strict=False)
    rest = [k for k in own if k.startswith(head)]
    return ImportResult(
        model.eval(),
        "torchvision",
        len(body),
        not_imported=rest,
        seconds=time.perf_counter() - start,
    )


def detect_source(path: str | os.PathLike[str]) -> str:
    """``"onnx"`` for ``.onnx`` files, else ``"state_dict"`` (the network decides which)."""
    return "onnx" if str(path).lower().endswith(".onnx") else "state_dict"


def import_weights(
    source: str | os.PathLike[str],
    network: str,
    embedding_size: int = 512,
    kind: str | None = None,
    input_size: tuple[int, int] = (112, 112),
) -> ImportResult:
    """Builds ``network`` and imports ``source`` into it.

    ``kind`` is one of ``SOURCES``; by default ``.onnx`` files are ONNX, and state dicts are
    arcface_torch's for ``iresnet*`` and torchvision's for ``resnet*``.
    """
    import inspect

    from backbones import BACKBONES, get_backbone

    builder = BACKBONES.get(network)
    takes_size = "input_size" in inspect.signature(builder).parameters
    kwargs = {"input_size": input_size} if takes_size else {}
    model = get_backbone(network, embedding_size=embedding_size, **kwargs)
    if kind is None:
        if detect_source(source) == "onnx":
            kind = "onnx"
        elif network.startswith("iresnet"):
            kind = "arcface_torch"
        elif network.startswith("resnet"):
            kind = "torchvision"
        else:
            raise ValueError(
                f"{source}: no state-dict importer for {network!r}; give an ONNX file or a "
                f"network of iresnet* (arcface_torch) or resnet* (torchvision)"
            )
    if kind == "onnx":
        return import_onnx(source, model, input_size)
    if kind == "arcface_torch":
        return import_arcface_torch(source, model)
    if kind == "torchvision":
        return import_torchvision(source, model)
    raise ValueError(f"unknown source kind {kind!r}; expected one of {SOURCES}")


def write_weights(
    model: nn.Module, out: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Writes ``model``'s state dict as ``.safetensors`` (through ``backbones.weights``) or, for
    any other suffix (``.pt``), as a plain ``torch.save``-d state dict."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_safetensors(model, out, metadata=metadata)
    else:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
    return out
