"""The trained network: the backbone built from config and its DDP wrapper.

Owns: building the backbone (registry name and parameters, initial weights, frozen stages,
BatchNorm statistics frozen on request, channels-last), wrapping it in DDP (gradients as
bucket views) with a comm hook that *sums* gradients over ranks, and its CPU copy for weight
files (:func:`cpu_state_dict`). Does not own the classifier (:mod:`dist_train.losses`,
:mod:`dist_train.partial_fc`) nor the step that trains them (:mod:`dist_train.train_step`).

Gradient scaling relative to DDP: every loss here is the *global-batch* mean, identical on all
ranks, and the gradient reaching each rank's local embeddings is exactly that loss's gradient
(see :mod:`dist_train.collectives`). DDP would average backbone gradients over ranks, i.e. divide
them by the world size; :func:`allreduce_sum_hook` makes it *sum* instead, so backbone gradients
equal the gradient a single process would compute on the whole global batch (pinned by
``tests/test_trainer.py::test_ddp_sum_hook_gives_single_process_gradients``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import backbones
from dist_train.config import TrainConfig

log = logging.getLogger(__name__)


def build_backbone(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The backbone from config, initialised from a file and partly frozen if asked."""
    bcfg = cfg.backbone
    model = backbones.get_backbone(
        bcfg.name,
        embedding_size=bcfg.embedding_size,
        checkpointing=bcfg.checkpointing,
        **({"dropout": bcfg.dropout} if bcfg.dropout else {}),
        **bcfg.params,
    )
    if bcfg.init_weights:
        # strict: every key must fit (the error names the file and the keys that do not)
        backbones.load_weights(model, bcfg.init_weights)
        log.info("backbone initialised from %s", bcfg.init_weights)
    if bcfg.freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(_batchnorm_eval_hook)
    if bcfg.freeze_stages:
        stages = model.stages()
        if bcfg.freeze_stages > len(stages):
            raise ValueError(
                f"backbone.freeze_stages={bcfg.freeze_stages} but {bcfg.name} has "
                f"{len(stages)} stages (stem included)"
            )
        for stage in stages[: bcfg.freeze_stages]:
            for p in stage.parameters():
                p.requires_grad_(False)
    model.to(device)
    if bcfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _batchnorm_eval_hook(module: nn.Module, args: Any) -> None:
    """``backbone.freeze_bn``: the BatchNorm runs in evaluation mode whatever ``train()`` set."""
    module.training = False


def allreduce_sum_hook(state, bucket):  # no annotations: DDP checks them as real types
    """DDP comm hook: sum gradients over ranks instead of averaging (see the module doc)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(backbone: nn.Module, device: torch.device) -> DDP:
    """DDP over the backbone; BatchNorm running statistics stay rank-local (as InsightFace
    does) instead of being broadcast from rank 0 at every forward.

    The caller registers :func:`allreduce_sum_hook` (``model.register_comm_hook(None, ...)``).
    """
    ids = [device.index] if device.type == "cuda" else None
    # Gradients are views into DDP's communication buckets: no copy between .grad and the
    # buckets after the all-reduce, and one gradient-sized buffer less per replica.
    kw: dict = {"device_ids": ids, "gradient_as_bucket_view": True}
    try:
        return DDP(backbone, forward_sync_buffers=False, **kw)
    except TypeError:  # torch releases before forward_sync_buffers
        return DDP(backbone, broadcast_buffers=False, **kw)


def cpu_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every tensor copied to the CPU (detached).

    Weight files written from it load on any machine without ``map_location`` and hold no
    reference to a GPU.
    """
    return {
        k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
        for k, v in module.state_dict().items()
    }
