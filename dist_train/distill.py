"""Knowledge distillation: a frozen teacher backbone and the embedding loss towards it.

Owns: building the teacher from ``cfg.distill`` (:func:`build_distiller`: a registered backbone
at the student's embedding size, loaded from its weights file, eval mode, ``requires_grad``
False, on the run's device), its forward on each micro-batch (under ``torch.no_grad()`` and,
with ``distill.teacher.amp``, the run's autocast) and the distillation term
(:func:`distillation_loss`). Does not own the step that adds the term to the margin loss
(:mod:`dist_train.train_step`) nor the student.

The teacher is not wrapped in DDP, has no optimizer and is not in checkpoints: every start and
every resume read it again from ``distill.teacher.weights``. Each rank runs it on its own local
micro-batch only, so the teacher embeddings of the global batch are computed once per step.

Gradient scaling (see :mod:`dist_train.model_setup`): the term is the mean over the *global*
batch of a per-sample loss. Each rank back-propagates the sum over its local samples divided by
the global batch size, which is exactly the gradient of the global term with respect to its
local embeddings; DDP's summing comm hook then gives the single-process gradient (pinned by
``tests/test_distill.py::test_distillation_gradients_two_ranks_equal_one_rank``). The value
returned is the global term on every rank (one scalar all-reduce, no host read).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import backbones
from dist_train.config import ConfigError, TrainConfig
from dist_train.distributed import all_reduce, get_world_size
from dist_train.precision import amp_dtype

__all__ = ["Distiller", "build_distiller", "distillation_loss"]

log = logging.getLogger(__name__)


def distillation_loss(
    local_student: torch.Tensor,
    local_teacher: torch.Tensor,
    *,
    l2_weight: float,
    cosine_weight: float,
    global_batch: int,
) -> torch.Tensor:
    """This rank's share of the global-batch distillation term.

    Args:
        local_student: ``[B_local, D]`` student embeddings (with their autograd history).
        local_teacher: ``[B_local, D]`` teacher embeddings (no gradient).
        l2_weight: weight of ``||s - t||^2 / D`` (mean squared difference per dimension).
        cosine_weight: weight of ``1 - cos(s, t)``.
        global_batch: the number of samples over all ranks the term is averaged over.

    Returns:
        ``sum over local samples of the weighted per-sample term / global_batch``; summed over
        ranks it is the global-batch mean.
    """
    if local_student.shape != local_teacher.shape:
        raise ValueError(
            f"distillation: student embeddings {tuple(local_student.shape)} and teacher "
            f"embeddings {tuple(local_teacher.shape)} differ in shape"
        )
    teacher = local_teacher.to(local_student.dtype)
    per_sample = local_student.new_zeros(local_student.shape[0])
    if l2_weight:
        per_sample = per_sample + l2_weight * (local_student - teacher).pow(2).mean(dim=1)
    if cosine_weight:
        cos = F.cosine_similarity(local_student, teacher, dim=1, eps=1e-12)
        per_sample = per_sample + cosine_weight * (1.0 - cos)
    return per_sample.sum() / global_batch


class Distiller:
    """The frozen teacher and the distillation term of one micro-batch.

    Args:
        teacher: the teacher network (set to eval mode and frozen here).
        l2_weight: see :func:`distillation_loss`.
        cosine_weight: see :func:`distillation_loss`.
        amp_dtype: autocast dtype of the teacher's forward, ``None`` for full precision.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        l2_weight: float,
        cosine_weight: float,
        amp_dtype: torch.dtype | None,
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.l2_weight = float(l2_weight)
        self.cosine_weight = float(cosine_weight)
        self.amp_dtype = amp_dtype

    def teacher_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings of this rank's normalised input ``x``, in fp32."""
        self.teacher.eval()  # always: its BatchNorm statistics are not updated
        with (
            torch.no_grad(),
            torch.autocast(
                x.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ),
        ):
            out = self.teacher(x)
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def __call__(self, x: torch.Tensor, local_student: torch.Tensor) -> torch.Tensor:
        """The global-batch distillation term (the same value on every rank); its gradient
        reaches this rank's ``local_student [B_local, D]`` only, scaled for the summing
        DDP hook. Every rank's micro-batch has the same size (batches are ``drop_last``)."""
        teacher = self.teacher_embeddings(x)
        global_batch = local_student.shape[0] * get_world_size()
        local = distillation_loss(
            local_student,
            teacher,
            l2_weight=self.l2_weight,
            cosine_weight=self.cosine_weight,
            global_batch=global_batch,
        )
        # the value of the global term, the gradient of this rank's share
        total = all_reduce(local.detach().clone())
        return local + (total - local.detach())


def build_distiller(cfg: TrainConfig, device: torch.device) -> Distiller | None:
    """The distiller of ``cfg.distill``, or ``None`` when no teacher is configured.

    Raises:
        ConfigError: the weights file does not exist or does not fit the teacher (one line
            naming ``distill.teacher.weights`` and the file).
    """
    dcfg = cfg.distill
    tcfg = dcfg.teacher
    if not tcfg.name:
        return None
    path = Path(tcfg.weights)
    if not path.is_file():
        raise ConfigError(f"distill.teacher.weights: teacher weights file {path} does not exist")
    teacher = backbones.get_backbone(
        tcfg.name, embedding_size=cfg.backbone.embedding_size, **tcfg.params
    )
    try:
        backbones.load_weights(teacher, path)
    except ValueError as exc:
        raise ConfigError(
            f"distill.teacher.weights: {exc} (the teacher is built with "
            f"backbone.embedding_size={cfg.backbone.embedding_size}: student and teacher "
            "embeddings are compared directly)"
        ) from exc
    teacher.to(device)
    if cfg.backbone.channels_last:
        teacher.to(memory_format=torch.channels_last)
    nparams = sum(p.numel() for p in teacher.parameters())
    log.info(
        "distillation: teacher %s (%.2fM parameters) from %s; l2_weight %g, cosine_weight %g",
        tcfg.name,
        nparams / 1e6,
        path,
        dcfg.l2_weight,
        dcfg.cosine_weight,
    )
    return Distiller(
        teacher,
        l2_weight=dcfg.l2_weight,
        cosine_weight=dcfg.cosine_weight,
        amp_dtype=amp_dtype(cfg.amp) if tcfg.amp else None,
    )
