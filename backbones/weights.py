"""Reading and writing backbone weights files.

Owns the file formats a backbone's weights travel in: a plain ``state_dict`` saved with
``torch.save`` (the trainer's ``model.pt``), a full training checkpoint (a dict whose
``"backbone"`` entry is that state dict, next to its ``"config"``), and ``.safetensors`` (no
pickle, for sharing). :func:`read_weights_file` is the project's one reader of them (the
evaluator's ``eval.runner.load_model`` reads through it). Does not own training checkpoints
themselves (``dist_train``) nor ONNX/TorchScript export (``backbones.export``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel and torch.compile wrappers


class WeightsFile(NamedTuple):
    """What a weights file holds for a backbone."""

    state: dict[str, Tensor]
    """``{key: tensor}`` on CPU, wrapper prefixes removed."""
    config: dict | None
    """The training config (a training checkpoint's ``"config"`` dict), else None."""


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, admitting the numpy arrays that training
    checkpoints hold (RNG states) and nothing else that could run code when unpickled.

    Raises:
        ValueError: the file cannot be read that way; the message names the file and the
            type torch refused (a whole pickled ``nn.Module`` is one: save ``state_dict()``).
    """
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    safe = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    safe += [type(np.dtype(t)) for t in ("uint8", "uint32", "int64", "float32", "float64")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # torch's message starts with generic advice; the line naming the culprit is later.
        detail = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "")
        raise ValueError(
            f"{path}: cannot load as a weights file or training checkpoint with "
            f"weights_only=True, so nothing in it was executed ({detail})"
        ) from exc


def read_weights_file(path: str | os.PathLike[str]) -> WeightsFile:
    """Reads a backbone state dict, and the training config when present, from a weights file.

    Args:
        path: a ``.safetensors`` file, a ``torch.save``-d state dict, or a training checkpoint
            (dict with a ``"backbone"`` key and optionally ``"config"``). Torch files are read
            with :func:`safe_torch_load` (never a full unpickle).

    Returns:
        The state on CPU with ``module.``/``_orig_mod.`` prefixes (DDP, DataParallel,
        ``torch.compile``) removed from every key, and the config dict or None.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read or holds no recognisable state dict (the message
            names the file and the keys it did find).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    config = None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
            raise ValueError(f"{path}: cannot read safetensors file ({exc})") from exc
    else:
        obj = safe_torch_load(path)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
        if "backbone" in obj:
            config = obj.get("config")
            obj = obj["backbone"]
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: key 'backbone' holds {type(obj).__name__}, not a dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"{path}: not a state dict (entries {bad[:5]} are not name -> tensor; top-level "
            f"keys: {list(obj)[:10]})"
        )
    return WeightsFile(_strip_prefixes(obj), config if isinstance(config, dict) else None)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The backbone state dict of a weights file (see :func:`read_weights_file`)."""
    return read_weights_file(path).state


def load_weights(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Loads a weights file into ``model`` (in place) and returns it.

    Args:
        model: the backbone, built with the same name and embedding size as the weights.
        path: see ``read_state_dict`` for the accepted formats.
        strict: when True any missing, unexpected or mis-shaped key raises. When False (for
            fine-tuning, e.g. a new embedding size) only keys present in both with the same
            shape are loaded, and a warning lists what was skipped.

    Raises:
        ValueError: keys or shapes do not match (strict) or nothing matches at all; the
            message names the file and the keys.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    summary = (
        f"{len(mismatched)} mis-shaped {mismatched[:3]}, {len(missing)} missing {missing[:5]}, "
        f"{len(unexpected)} unexpected {unexpected[:5]}"
    )
    if strict and (mismatched or missing or unexpected):
        raise ValueError(
            f"{path}: weights do not fit {type(model).__name__}: {summary} (wrong --network or "
            "--embedding-size?)"
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not usable:
        raise ValueError(f"{path}: no key fits {type(model).__name__}: {summary}")
    if len(usable) < len(own) or len(usable) < len(state):
        warnings.warn(f"{path}: partial load into {type(model).__name__}: {summary}", stacklevel=2)
    model.load_state_dict(usable, strict=False)
    return model


def save_safetensors(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Writes ``model.state_dict()`` (parameters and buffers) to a ``.safetensors`` file.

    Tensors are made contiguous and un-shared first, because safetensors refuses views and
    aliased storage. ``metadata`` (string -> string, e.g. the network name) goes in the header.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata stored in a ``.safetensors`` header (empty dict if none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
