"""Host synchronisations of one training step, counted on CPU.

On a GPU, every read of a device value by the host (``.item()``, ``.tolist()``, ``bool()`` /
``float()`` / ``int()`` of a tensor, ``.cpu()``), every op whose output shape depends on the
data (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing) and every tensor built
from Python data on the device (``torch.tensor``) waits for the queued work. On CPU nothing
waits, but the same calls are made: :class:`SyncCounter` wraps them and records who called,
for the length of one step of a real :class:`dist_train.trainer.Trainer` (the body of its
``fit`` loop: the step, the meter, the evaluation and checkpoint checks). Pinned: at most one
on a step that logs nothing, and the log step's extra reads are the loss window and the
gradient norm (and the loss scale under fp16) only.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch

from dist_train.config import load_config
from dist_train.distributed import DistInfo
from tests.conftest import tiny_overrides
from tests.dist_utils import run_distributed

_TENSOR_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "nonzero")
_TENSOR_METHODS += ("unique", "masked_select", "argwhere")
_TORCH_FUNCTIONS = ("nonzero", "unique", "masked_select", "argwhere", "tensor")


def _has_bool_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class SyncCounter:
    """Counts the synchronising calls made from Python while active; ``where`` holds the
    caller (file:line, outside torch itself) of each."""

    def __init__(self) -> None:
        self.where: Counter[str] = Counter()
        self._saved: list[tuple[object, str, object]] = []
        self._busy = False

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def _record(self, name: str) -> None:
        frames = traceback.extract_stack()[:-2]  # without this method and the wrapper
        outside = [f for f in frames if "/torch/" not in f.filename]
        f = outside[-1] if outside else frames[-1]
        path = Path(f.filename)
        self.where[f"{name} @ {path.parent.name}/{path.name}:{f.lineno}"] += 1

    def _wrap(self, owner: object, name: str, when=None) -> None:
        original = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            if not counter._busy and (when is None or when(*args, **kwargs)):
                counter._busy = True  # a counted call's own internals are not counted again
                try:
                    counter._record(name)
                finally:
                    counter._busy = False
            if counter._busy:
                return original(*args, **kwargs)
            counter._busy = True
            try:
                return original(*args, **kwargs)
            finally:
                counter._busy = False

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self) -> SyncCounter:
        for name in _TENSOR_METHODS:
            self._wrap(torch.Tensor, name)
        for name in _TORCH_FUNCTIONS:
            self._wrap(torch, name)
        # boolean-mask indexing is a nonzero in disguise
        self._wrap(torch.Tensor, "__getitem__", lambda _t, index: _has_bool_mask(index))
        self._wrap(torch.Tensor, "__setitem__", lambda _t, index, _v: _has_bool_mask(index))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def test_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item()
        bool(x.any())
        float(x[0])
        x[x > 2]
        torch.nonzero(x)
        torch.unique(x)
        x.tolist()
        torch.tensor([1.0])
        y = x * 2 + 1  # device work only: not counted
        y.cumsum(0)
    assert c.count == 8, c.where


def _step_counts(trainer, batches: list) -> tuple[int, Counter]:
    """One pass of the body of ``Trainer.fit``'s loop under a :class:`SyncCounter`."""
    with SyncCounter() as counter:
        loss = trainer.train_step(iter(batches))
        trainer.meter.log_step(loss, trainer.train_step, trainer.total_steps)
        trainer.evaluator.maybe_evaluate()
        trainer.checkpointer.maybe_save()
    return counter.count, counter.where


def _count_steps(cfg_overrides: list[str], dist_info: DistInfo) -> dict:
    from dist_train.trainer import Trainer

    trainer = Trainer(load_config(None, cfg_overrides), dist_info)
    k = trainer.cfg.grad_accum_steps
    it = iter(trainer.data.loader)
    batches = [[next(it) for _ in range(k)] for _ in range(3)]
    trainer.meter.start(0)
    trainer.train_step(iter(batches[0]))  # the first step builds optimizer state
    quiet, quiet_where = _step_counts(trainer, batches[1])  # step 2: no log line
    assert trainer.step == 2 and trainer.step % trainer.meter.log_every_steps != 0
    trainer.meter.log_every_steps = 3
    logged, logged_where = _step_counts(trainer, batches[2])  # step 3: a log line
    return {
        "quiet": quiet,
        "quiet_where": dict(quiet_where),
        "logged": logged,
        "logged_where": dict(logged_where),
    }


def _overrides(data: Path, run: Path, **extra) -> list[str]:
    return tiny_overrides(data, run, **{"log_every_steps": 1000, "eval.every_steps": 0, **extra})


def _assert_pinned(res: dict, head_syncs: int = 0) -> None:
    """At most one host read per step outside the head's own maths (``head_syncs`` of them
    there: a metric head's grouping of the batch by class, :mod:`heads.metric`)."""
    in_heads = sum(n for where, n in res["quiet_where"].items() if " @ heads/" in where)
    assert in_heads == head_syncs, res["quiet_where"]
    res = {**res, "quiet": res["quiet"] - in_heads, "logged": res["logged"] - in_heads}
    assert res["quiet"] <= 1, f"host syncs of a step without logging: {res['quiet_where']}"
    # a log step reads the loss window, the gradient norm and (fp16) the loss scale besides
    assert res["logged"] <= res["quiet"] + 3, f"host syncs of a log step: {res['logged_where']}"


@pytest.mark.parametrize(
    "extra",
    [
        {"partial_fc.sample_rate": 0.5},  # 12 classes, 8 samples: a sampled shard
        {"amp": "fp16"},  # GradScaler
        {"grad_accum_steps": 2, "optim.grad_clip_norm": 1.0},
        {"head.params": "{s: 16.0, m: 0.2, center_loss_weight: 0.01}"},
        {"head.params": "{s: 16.0, m: 0.2, center_loss_weight: 0.01, center_loss_update: alpha}"},
        {
            "head.name": "amsoftmax_proto",  # Partial FC + a metric head with parameters
            "head.params": "{s: 30.0, m: 0.1, m_per_class: 2}",
            "data.sampler": "m_per_class",
            "data.m_per_class": 2,
            "amp": "fp16",
            "head_syncs": 3,  # angleproto's grouping: unique and two tolist (heads.metric)
        },
        # the adaptive margin heads: their batch inputs and running state read nothing back
        {"head.name": "adaface", "head.params": "{s: 16.0}", "partial_fc.sample_rate": 0.5},
        {"head.name": "curricularface", "head.params": "{s: 16.0}", "partial_fc.sample_rate": 0.5},
        {"head.name": "elasticface_arc", "head.params": "{s: 16.0}"},
        {"head.name": "elasticface_cos", "head.params": "{s: 16.0}"},
    ],
    ids=[
        "sampled",
        "fp16",
        "accum-clip",
        "center",
        "center-alpha",
        "combined-fp16",
        "adaface",
        "curricularface",
        "elasticface_arc",
        "elasticface_cos",
    ],
)
def test_one_process_step_syncs_once(tiny_data, tmp_path, extra):
    extra = dict(extra)
    head_syncs = extra.pop("head_syncs", 0)
    res = _count_steps(_overrides(tiny_data, tmp_path / "run", **extra), DistInfo())
    _assert_pinned(res, head_syncs)


def _worker(rank: int, world: int, data: str, run: str) -> dict:
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    overrides = _overrides(Path(data), Path(run), **{"partial_fc.sample_rate": 0.5})
    return _count_steps(overrides, info)


@pytest.mark.slow
def test_two_gloo_processes_step_syncs_once(tiny_data, tmp_path):
    for res in run_distributed(_worker, 2, str(tiny_data), str(tmp_path / "run")):
        _assert_pinned(res)


def test_loader_checks_labels_on_the_host(tiny_data, tmp_path):
    # The step reads no label back from the device: the loader checks them as it builds the
    # batch, and names the data and the image.
    from dist_train.data.datasets import DataError
    from dist_train.data.loader import build_train_data

    cfg = load_config(None, _overrides(tiny_data, tmp_path / "run"))
    data = build_train_data(cfg.data, DistInfo(), seed=0)
    first = next(iter(data.loader))[1]
    assert int(first.max()) < data.num_classes
    data.dataset.labels[:] = data.num_classes  # every image now has a label outside [0, C)
    with pytest.raises(DataError, match=r"image \d+ has label 12, outside \[0, 12\)"):
        next(iter(data.loader))
