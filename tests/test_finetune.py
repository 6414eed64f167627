"""Fine-tuning a released backbone: ``finetune_pretrained_mobilefacenet.yaml`` from imported
weights (``.safetensors`` and ``.pt`` plain state dicts), frozen stages, ``backbone.freeze_bn``,
``optim.backbone_lr_scale`` and the evaluation before and after."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import backbones
from backbones.weights import save_safetensors
from dist_train.config import load_config
from dist_train.distributed import DistInfo
from dist_train.model_setup import build_backbone

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "launch" / "configs" / "recipes" / "finetune_pretrained_mobilefacenet.yaml"
SMALL_NET = {"backbone.params": "{input_size: 32, width_mult: 0.25}", "backbone.embedding_size": 64}


def _overrides(data: Path, run: Path, init: Path | str, **extra) -> list[str]:
    sets = {
        "output_dir": run,
        "data.root": data,
        "data.format": "auto",
        "data.image_size": 32,
        "data.batch_size": 16,
        "data.num_workers": 0,
        "max_steps": 3,
        "log_every_steps": 1,
        "tensorboard": False,
        "checkpoint.at_epoch_end": False,
        "backbone.init_weights": init,
        "eval.targets": f"[{data / 'val_pairs.csv'}]",
        "eval.batch_size": 32,
        **SMALL_NET,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def _released(path: Path) -> dict[str, torch.Tensor]:
    """A 'released' small MobileFaceNet written as the weights importer writes it."""
    torch.manual_seed(7)
    net = backbones.get_backbone("mobilefacenet", embedding_size=64, input_size=32, width_mult=0.25)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        save_safetensors(net, path)
    else:
        torch.save(state, path)
    return state


def test_freeze_bn_keeps_running_statistics_in_training(tmp_path):
    for freeze in (False, True):
        cfg = load_config(
            None,
            [
                "backbone.name=mobilefacenet",
                f"backbone.freeze_bn={str(freeze).lower()}",
                *[f"{k}={v}" for k, v in SMALL_NET.items()],
            ],
        )
        net = build_backbone(cfg, torch.device("cpu"))
        x = torch.randn(8, 3, 32, 32)
        net.eval()
        with torch.no_grad():
            want = net(x)
        before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
        net.train()
        with torch.no_grad():
            got = net(x)
        after = {k: v for k, v in net.state_dict().items() if "running" in k}
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == freeze
        assert torch.allclose(got, want, atol=1e-5) == freeze
        assert net.training  # the rest of the network still trains


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_finetune_recipe_from_imported_weights(tiny_data, tmp_path, suffix):
    from dist_train.trainer import Trainer
    from eval.runner import evaluate_targets

    init = tmp_path / f"released{suffix}"
    released = _released(init)
    cfg = load_config(RECIPE, _overrides(tiny_data, tmp_path / "run", init))
    trainer = Trainer(cfg, DistInfo())
    net = trainer.backbone
    assert all(torch.equal(v, released[k]) for k, v in net.state_dict().items())
    # optimizer groups: the backbone at optim.lr * 0.01, the new Partial FC head at optim.lr
    scale = cfg.optim.backbone_lr_scale
    assert scale == 0.01
    assert {g["lr_scale"] for g in trainer.optimizer.param_groups} == {scale}
    pfc_opt = trainer.loss.partial_fc.optimizer
    assert trainer.loss.partial_fc.weight.shape[0] == 12  # a new head over the new identities
    lrs: list[tuple[float, float]] = []
    evals: list[tuple[str, dict]] = []

    def on_step(loss):
        lrs.append((trainer.optimizer.param_groups[0]["lr"], pfc_opt.param_groups[0]["lr"]))

    trainer.fit(on_step=on_step, on_evaluate=lambda tag, r: evals.append((tag, r)))
    assert len(lrs) == 3
    assert all(b == pytest.approx(scale * h) and h > 0 for b, h in lrs)
    # the log's lr is optim.lr x schedule (the head's here), not the scaled backbone group's
    logged = re.findall(r"step \d+/3 .* lr (\S+)", (tmp_path / "run" / "train.log").read_text())
    assert [float(v) for v in logged] == pytest.approx([h for _, h in lrs], rel=1e-2)
    # scored before the first step with the released weights, and after the last
    assert [tag for tag, _ in evals] == ["initial", ""]
    ref = backbones.get_backbone("mobilefacenet", embedding_size=64, input_size=32, width_mult=0.25)
    ref.load_state_dict(released)
    want = evaluate_targets(ref, cfg.eval.targets, batch_size=32)["val_pairs"]
    assert evals[0][1]["val_pairs"]["eer"] == pytest.approx(want["eer"], abs=1e-6)
    run = tmp_path / "run"
    initial = json.loads((run / "metrics_initial.json").read_text())
    assert json.dumps(initial, sort_keys=True) == json.dumps(evals[0][1], sort_keys=True)
    assert (run / "metrics.json").is_file() and (run / "model.pt").is_file()
    # frozen stages (stem + 2) and every BatchNorm statistic unchanged; the rest trained
    stages = net.stages()
    frozen = {id(p) for s in stages[:3] for p in s.parameters()}
    params = dict(net.named_parameters())
    assert all(torch.equal(p.detach(), released[n]) for n, p in params.items() if id(p) in frozen)
    assert any(
        not torch.equal(p.detach(), released[n]) for n, p in params.items() if id(p) not in frozen
    )
    buffers = {k: v for k, v in net.state_dict().items() if "running" in k}
    assert all(torch.equal(v, released[k]) for k, v in buffers.items())
