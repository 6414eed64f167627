"""Knowledge distillation (:mod:`dist_train.distill`): config errors, the loss maths, float64
gradient parity of 2 ranks with 1, and a 2-process run end to end with exact resume."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from dist_train.config import ConfigError, load_config
from dist_train.distributed import DistInfo
from tests.conftest import TinyConvNet, tiny_overrides
from tests.dist_utils import run_distributed


def _teacher_file(path: Path, embedding_size: int = 16, seed: int = 123) -> Path:
    """A freshly built tiny teacher saved as a state dict (as any weights file would be)."""
    torch.manual_seed(seed)
    torch.save(TinyConvNet(embedding_size).state_dict(), path)
    return path


def _distill_sets(teacher: Path, **extra) -> dict:
    return {
        "distill.teacher.name": "_test_tinyconv",
        "distill.teacher.weights": str(teacher),
        "distill.l2_weight": 0.5,
        "distill.cosine_weight": 2.0,
        **extra,
    }


# ------------------------------------------------------------------------------------------
# Config


def test_unknown_distill_keys_name_the_dotted_path():
    with pytest.raises(
        ConfigError, match=r"distill\.teacher\.wieghts; did you mean distill\.teacher\.weights"
    ):
        load_config(None, ["distill.teacher.wieghts=x.pt"])
    with pytest.raises(ConfigError, match=r"distill\.l2; did you mean distill\.l2_weight"):
        load_config(None, ["distill.l2=1"])
    sets = ["distill.teacher.name=iresnet50", "distill.teacher.weights=t.pt"]
    with pytest.raises(ConfigError, match=r"distill\.teacher\.params\.width; did you mean"):
        load_config(None, [*sets, "distill.teacher.params={width: 0.5}"])
    with pytest.raises(ConfigError, match=r"distill\.teacher\.name='iresnet5'"):
        load_config(None, ["distill.teacher.name=iresnet5", "distill.teacher.weights=t.pt"])
    with pytest.raises(ConfigError, match=r"needs distill\.teacher\.weights"):
        load_config(None, ["distill.teacher.name=iresnet50"])
    with pytest.raises(ConfigError, match=r"distill\.cosine_weight must be >= 0"):
        load_config(None, [*sets, "distill.cosine_weight=-1"])
    with pytest.raises(ConfigError, match=r"distill\.teacher\.params\.embedding_size"):
        load_config(None, [*sets, "distill.teacher.params={embedding_size: 128}"])
    cfg = load_config(None, [*sets, "distill.teacher.params={width_mult: '0.5'}"])
    assert cfg.distill.enabled and cfg.distill.teacher.params == {"width_mult": 0.5}
    assert not load_config(None).distill.enabled


def test_missing_or_unfitting_teacher_file_is_a_one_line_error(tmp_path):
    from dist_train.distill import build_distiller

    missing = tmp_path / "no_such_teacher.pt"
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path / "run", **_distill_sets(missing)))
    with pytest.raises(ConfigError) as err:
        build_distiller(cfg, torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and "distill.teacher.weights" in msg and str(missing) in msg
    # a teacher of another embedding size does not fit the student's
    other = _teacher_file(tmp_path / "t8.pt", embedding_size=8)
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path / "run", **_distill_sets(other)))
    with pytest.raises(ConfigError) as err:
        build_distiller(cfg, torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and str(other) in msg and "backbone.embedding_size=16" in msg


def test_teacher_is_frozen_and_reads_any_weights_format(tmp_path):
    from backbones.weights import save_safetensors
    from dist_train.distill import build_distiller

    torch.manual_seed(5)
    net = TinyConvNet(16)
    path = tmp_path / "teacher.safetensors"
    save_safetensors(net, path)
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path / "run", **_distill_sets(path)))
    distiller = build_distiller(cfg, torch.device("cpu"))
    teacher = distiller.teacher
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
    x = torch.randn(4, 3, 32, 32)
    student = torch.randn(4, 16, requires_grad=True)
    loss = distiller(x, student)
    loss.backward()
    assert student.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_distillation_loss_is_the_weighted_batch_mean():
    from dist_train.distill import distillation_loss

    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    got = distillation_loss(s, t, l2_weight=0.5, cosine_weight=2.0, global_batch=6)
    want = (
        sum(
            0.5 * ((s[i] - t[i]) ** 2).sum() / 5
            + 2.0 * (1 - torch.dot(s[i], t[i]) / (s[i].norm() * t[i].norm()))
            for i in range(6)
        )
        / 6
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # a share of a larger global batch
    half = distillation_loss(s[:3], t[:3], l2_weight=0.5, cosine_weight=2.0, global_batch=6)
    rest = distillation_loss(s[3:], t[3:], l2_weight=0.5, cosine_weight=2.0, global_batch=6)
    assert (half + rest).item() == pytest.approx(got.item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"\(6, 5\) and teacher embeddings \(6, 4\)"):
        distillation_loss(s, t[:, :4], l2_weight=1.0, cosine_weight=0.0, global_batch=6)


# ------------------------------------------------------------------------------------------
# float64 gradient parity: 2 ranks (DDP, summing hook) == 1 process on the global batch


def _distill_grads(rank, world, global_x, student_state, teacher_state):
    from dist_train.distill import Distiller
    from dist_train.model_setup import allreduce_sum_hook, wrap_ddp

    student = TinyConvNet(16).double()
    student.load_state_dict(student_state)
    teacher = TinyConvNet(16).double()
    teacher.load_state_dict(teacher_state)
    seen = []
    teacher.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    distiller = Distiller(teacher, l2_weight=0.5, cosine_weight=2.0, amp_dtype=None)
    per = global_x.shape[0] // world
    x = global_x[rank * per : (rank + 1) * per]
    model = student
    if world > 1:
        model = wrap_ddp(student, torch.device("cpu"))
        model.register_comm_hook(None, allreduce_sum_hook)
    loss = distiller(x, model(x))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    teacher_grads = [p.grad for p in teacher.parameters()]
    return loss.item(), grads, seen, teacher_grads


@pytest.mark.slow
def test_distillation_gradients_two_ranks_equal_one_rank():
    torch.manual_seed(1)
    student = TinyConvNet(16).double().state_dict()
    teacher = TinyConvNet(16).double().state_dict()
    x = torch.randn(12, 3, 16, 16, dtype=torch.float64)
    # the reference: one process (no process group) on the whole global batch
    ref_loss, ref_grads, ref_seen, _ = _distill_grads(0, 1, x, student, teacher)
    assert ref_seen == [12]
    for loss, grads, seen, teacher_grads in run_distributed(_distill_grads, 2, x, student, teacher):
        # the global term on every rank; the teacher ran on this rank's 6 samples only
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        assert seen == [6]
        assert all(g is None for g in teacher_grads)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=k)


# ------------------------------------------------------------------------------------------
# End to end: 2 processes, stop and resume


def _fit_distilled(rank, world, data, run_dir, teacher_path, stop_after):
    import tests.conftest  # noqa: F401 - registers the tiny test backbone in this process
    from dist_train.distributed import current_info
    from dist_train.trainer import Trainer

    sets = {"max_steps": 4, "optim.name": "adamw", "optim.lr": 1e-3}
    cfg = load_config(None, tiny_overrides(data, run_dir, **sets, **_distill_sets(teacher_path)))
    trainer = Trainer(cfg, current_info())
    margin, terms, teacher_rows = [], [], []
    trainer.loss.register_forward_hook(lambda m, inp, out: margin.append(out.item()))
    distill_call = trainer.distill.__call__

    def recording(x, student):
        out = distill_call(x, student)
        terms.append(out.item())
        return out

    trainer.train_step.distill = _Call(recording)  # the step calls it in each micro-batch
    trainer.distill.teacher.register_forward_hook(
        lambda m, inp, out: teacher_rows.append(inp[0].shape[0])
    )
    losses = []

    def on_step(loss):
        losses.append(loss)
        if stop_after and trainer.step == stop_after:
            trainer.train_step.request_stop(signal.SIGTERM)

    trainer.fit(on_step=on_step)
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_????????.pt"))
    ckpt = torch.load(ckpts[-1], weights_only=False) if ckpts else None
    student_params = sum(1 for p in trainer.backbone.parameters())
    return {
        "losses": losses,
        "margin": margin,
        "terms": terms,
        "teacher_rows": teacher_rows,
        "teacher_state": {k: v.clone() for k, v in trainer.distill.teacher.state_dict().items()},
        "teacher_training": trainer.distill.teacher.training,
        "teacher_requires_grad": any(p.requires_grad for p in trainer.distill.teacher.parameters()),
        "student": {k: v.clone() for k, v in trainer.backbone.state_dict().items()},
        "ckpt_keys": sorted(ckpt) if ckpt else [],
        "ckpt_backbone_keys": sorted(ckpt["backbone"]) if ckpt else [],
        "ckpt_optimizer_params": (
            sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"]) if ckpt else 0
        ),
        "ckpt_optimizer_states": len(ckpt["optimizer"]["state"]) if ckpt else 0,
        "student_params": student_params,
        "step": trainer.step,
    }


def _fit_three(rank, world, data, tmp, teacher_path):
    """The whole run, one stopped after 2 steps, and its resumption (one pair of processes)."""
    return {
        "full": _fit_distilled(rank, world, data, tmp / "full", teacher_path, 0),
        # a stop requested after step 1 is agreed on in step 2's all-reduce
        "cut": _fit_distilled(rank, world, data, tmp / "cut", teacher_path, 1),
        "resumed": _fit_distilled(rank, world, data, tmp / "cut", teacher_path, 0),
    }


class _Call:
    """Stands in for the distiller in the step, calling ``fn``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, student):
        return self.fn(x, student)


@pytest.mark.slow
def test_distillation_two_processes_end_to_end_with_exact_resume(tiny_data, tmp_path):
    teacher_path = _teacher_file(tmp_path / "teacher.pt")
    teacher_state = torch.load(teacher_path, weights_only=True)

    out = run_distributed(_fit_three, 2, tiny_data, tmp_path, teacher_path, timeout_s=120)
    full = [o["full"] for o in out]
    r0, r1 = full
    assert r0["step"] == 4 and len(r0["losses"]) == 4
    # every step's loss is the margin loss plus the distillation term, the same on both ranks
    assert len(r0["terms"]) == 4 and all(t > 0 and math.isfinite(t) for t in r0["terms"])
    for loss, margin, term in zip(r0["losses"], r0["margin"], r0["terms"]):
        assert loss == pytest.approx(margin + term, rel=1e-6)
    assert r0["losses"] == pytest.approx(r1["losses"], rel=1e-6)
    assert r0["terms"] == pytest.approx(r1["terms"], rel=1e-6)
    # each rank's teacher ran on its own 8 samples once per step: 16 = the global batch
    assert r0["teacher_rows"] == [8] * 4 and r1["teacher_rows"] == [8] * 4
    cut, resumed = [o["cut"] for o in out], [o["resumed"] for o in out]
    # the teacher is frozen: unchanged, eval mode, no gradients (read from its file on resume)
    for r in full + resumed:
        assert not r["teacher_training"] and not r["teacher_requires_grad"]
        for k, v in teacher_state.items():
            assert torch.equal(r["teacher_state"][k], v), k
    # the checkpoint holds the student and its optimizer only
    assert not any("teacher" in k or "distill" in k for k in r0["ckpt_keys"])
    assert r0["ckpt_backbone_keys"] == sorted(r0["student"])
    assert r0["ckpt_optimizer_params"] == r0["student_params"]
    assert r0["ckpt_optimizer_states"] == r0["student_params"]
    # stopped after 2 steps and resumed: the same losses and weights as the run without a break
    assert cut[0]["step"] == 2
    assert resumed[0]["step"] == 4 and len(resumed[0]["losses"]) == 2
    assert cut[0]["losses"] + resumed[0]["losses"] == pytest.approx(r0["losses"], rel=1e-6)
    for k, v in r0["student"].items():
        torch.testing.assert_close(resumed[0]["student"][k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_without_a_teacher_the_trainer_builds_no_distiller(tiny_data, tmp_path):
    from dist_train.trainer import Trainer

    trainer = Trainer(load_config(None, tiny_overrides(tiny_data, tmp_path / "r")), DistInfo())
    assert trainer.distill is None and trainer.train_step.distill is None


def test_distillation_adds_no_host_synchronisation(tiny_data, tmp_path):
    from tests.test_host_syncs import _assert_pinned, _count_steps, _overrides

    teacher_path = _teacher_file(tmp_path / "teacher.pt")
    extra = {"amp": "fp16", "grad_accum_steps": 2}
    plain = _count_steps(_overrides(tiny_data, tmp_path / "a", **extra), DistInfo())
    sets = {**extra, **_distill_sets(teacher_path)}
    distilled = _count_steps(_overrides(tiny_data, tmp_path / "b", **sets), DistInfo())
    _assert_pinned(distilled)
    assert (distilled["quiet"], distilled["logged"]) == (plain["quiet"], plain["logged"])
