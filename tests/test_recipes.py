"""The shipped recipes (``launch/configs/recipes/``): hyper-parameters, short 2-rank runs, and
the two-stage pretrain -> fine-tune flow with its test EER.

Every recipe config is loaded and checked against the values its report states. Then each
recipe is trained for 2 steps on 2 gloo ranks on tiny synthetic data, through the real
``Trainer`` built from the shipped file plus ``--set``-style overrides that only shrink it
(data, input size, steps; a tiny backbone where the real one is slow on CPU, the real family
at least once per recipe). All single-stage runs share one pair of processes to keep process
start-up costs low.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from dist_train.config import load_config
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "launch" / "configs" / "recipes"
CONFIGS = sorted(p.name for p in RECIPES.glob("*.yaml"))


def _cfg(name: str, overrides: list[str] | None = None):
    return load_config(RECIPES / name, overrides)


def _nproc(name: str) -> int:
    """Processes per node of the ``torchrun`` line in the config's header comment."""
    found = re.search(r"--nproc_per_node=(\d+)", (RECIPES / name).read_text())
    assert found, f"{name}: no torchrun line in the header comment"
    return int(found.group(1))


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


# ------------------------------------------------------------------------------------------
# The configs state what the reports state

_R1 = {
    "backbone.name": "thin_resnet50_v2",
    "backbone.embedding_size": 512,
    "data.random_resized_crop": True,
    "data.crop_area_min": 0.8,
    "optim.name": "adam",
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
}
_R2 = {
    "num_epochs": 12,
    "data.hflip": True,
    "data.center_crop": 112,
    "data.sampler": "identity_ratio",
    "head.name": "arcface",
    "eval.best_metric": "lfw/accuracy",
}
_R3 = {
    "backbone.name": "resnet50",
    "backbone.embedding_size": 512,
    "head.params.s": 64.0,
    "data.num_classes": 700,
}
_R4 = {
    "backbone.name": "resnet50",
    "backbone.embedding_size": 128,
    "optim.name": "adamw",
    "optim.weight_decay": 0.05,
}
_R5 = {
    "backbone.name": "resnet34",
    "backbone.embedding_size": 128,
    "backbone.init_weights": "",
    "data.image_size": 160,
    "data.hflip": True,
    "data.mean": 0.5,
    "data.std": 0.5,
    "optim.name": "adam",
    "optim.lr": 1e-3,
    "global_batch": 64,
}
# MS1MV2 (InsightFace's faces_emore) with iResNet-100 and SGD: the heads' papers' common setup.
_MS1MV2 = {
    "backbone.name": "iresnet100",
    "backbone.embedding_size": 512,
    "data.num_classes": 85742,
    "partial_fc.sample_rate": 1.0,
    "optim.name": "sgd",
    "optim.lr": 0.1,
    "optim.momentum": 0.9,
    "optim.weight_decay": 5e-4,
    "scheduler.name": "step",
    "scheduler.gamma": 0.1,
}
EXPECTED: dict[str, dict] = {
    "vggface2_thinresnet50v2_amsoftmax.yaml": {
        **_R1,
        "head.name": "amsoftmax",
        "head.params": {"s": 30.0, "m": 0.1},
        "optim.lr": 1e-3,
        "scheduler.name": "cosine_restarts",
        "scheduler.cycle_epochs": 10.0,
        "scheduler.min_lr": 1e-5,
        "global_batch": 200,
        "data.sampler": "identity_cap",
        "data.max_images_per_identity": 200,
        "num_epochs": 60,
    },
    **{
        f"korean_finetune_angleproto_m{m}.yaml": {
            **_R1,
            "head.name": "angleproto",
            "head.params": {"init_w": 10.0, "init_b": -5.0, "m_per_class": m},
            "data.sampler": "m_per_class",
            "data.m_per_class": m,
            "data.num_classes": 1229,
            "global_batch": 250 * m,  # 250 identities x M images
            "optim.lr": 5e-4,
            "num_epochs": 50,
            "backbone.init_weights": "runs/vggface2_thinresnet50v2_amsoftmax/model.pt",
            "eval.every_epoch": True,
            "eval.best_metric": "val/eer",
        }
        for m in (2, 3, 4)
    },
    "casia_iresnet50_arcface.yaml": {**_R2, "backbone.name": "iresnet50"},
    "casia_efficientnet_b3_arcface.yaml": {**_R2, "backbone.name": "efficientnet_b3"},
    "asian_resnet50_normface.yaml": {**_R3, "head.name": "normface", "head.params": {"s": 64.0}},
    "asian_resnet50_intra_angle.yaml": {**_R3, "head.name": "normface"},
    **{
        f"asian_resnet50_arcface_{d}deg.yaml": {
            **_R3,
            "head.name": "arcface_deg",
            "head.params.m": float(d),
        }
        for d in (30, 45, 60)
    },
    "lfw_resnet50_contrastive.yaml": {
        **_R4,
        "head.name": "contrastive",
        "head.params.miner": "none",
    },
    "lfw_resnet50_contrastive_semihard.yaml": {
        **_R4,
        "head.name": "contrastive",
        "head.params.miner": "semi_hard",
    },
    "lfw_resnet50_margin.yaml": {**_R4, "head.name": "margin"},
    "lfw_resnet50_arcface_adacos.yaml": {
        **_R4,
        "head.name": "arcface",
        "head.params.s": round(math.sqrt(2) * math.log(1679), 4),
    },
    "vggface2_resnet34_softmax.yaml": {**_R5, "head.name": "softmax"},
    "vggface2_resnet34_center.yaml": {
        **_R5,
        "head.name": "softmax",
        "head.params.center_loss_weight": 0.003,
    },
    "vggface2_resnet34_arcface.yaml": {**_R5, "head.name": "arcface"},
    # arcface_torch's configs/wf42m_pfc03_40epoch_8gpu_vit_t.py
    "webface42m_vit_t_cosface.yaml": {
        "backbone.name": "vit_t",
        "backbone.embedding_size": 512,
        "backbone.params": {"drop_path_rate": 0.05, "mask_ratio": 0.0},  # vit_t_dp005_mask0
        "head.name": "cosface",
        "head.params": {"s": 64.0, "m": 0.4},
        "partial_fc.sample_rate": 0.3,
        "partial_fc.update": "dense",
        "optim.name": "adamw",
        "optim.lr": 1e-3,
        "optim.weight_decay": 0.1,
        "scheduler.name": "poly",
        "scheduler.warmup_epochs": 4.0,
        "global_batch": 4096,
        "num_epochs": 40,
        "data.num_classes": 2059906,
    },
    "distill_iresnet50_to_mobilefacenet.yaml": {
        "backbone.name": "mobilefacenet",
        "backbone.embedding_size": 512,
        "head.name": "arcface",
        "head.params": {"s": 64.0, "m": 0.5},
        "distill.teacher.name": "iresnet50",
        "distill.teacher.weights": "runs/casia_iresnet50_arcface/model.pt",
        "distill.teacher.amp": True,
        "distill.l2_weight": 1.0,
        "distill.cosine_weight": 1.0,
        "amp": "bf16",
        "global_batch": 512,
    },
    # The margin heads of docs/heads.md, each with its paper's training setup.
    "ms1mv2_iresnet100_adaface.yaml": {
        **_MS1MV2,
        "head.name": "adaface",
        "head.params": {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01},
        "optim.no_decay_norm_bias": True,
        "scheduler.milestones_epochs": [12, 20, 24],
        "num_epochs": 26,
        "global_batch": 512,
    },
    "ms1mv2_iresnet100_magface.yaml": {
        **_MS1MV2,
        "head.name": "magface",
        "head.params": {
            "s": 64.0,
            "l_a": 10.0,
            "u_a": 110.0,
            "l_m": 0.45,
            "u_m": 0.8,
            "lambda_g": 35.0,
        },
        "scheduler.milestones_epochs": [10, 18, 22],
        "num_epochs": 25,
        "global_batch": 512,
    },
    "ms1mv2_iresnet100_curricularface.yaml": {
        **_MS1MV2,
        "head.name": "curricularface",
        "head.params": {"s": 64.0, "m": 0.5, "t_alpha": 0.01},
        "optim.no_decay_norm_bias": True,
        "scheduler.milestones_epochs": [10, 18, 22],
        "num_epochs": 24,
        "global_batch": 512,
    },
    **{
        f"ms1mv2_iresnet100_elasticface_{v}.yaml": {
            **_MS1MV2,
            "head.name": f"elasticface_{v}",
            "head.params": {"s": 64.0, "m": m, "sigma": 0.05, "seed": 0},
            "scheduler.milestones_epochs": [7, 13, 19, 24],
            "num_epochs": 26,
            "global_batch": 512,
        }
        for v, m in (("arc", 0.5), ("cos", 0.35))
    },
    "ms1mv0_iresnet100_subcenter_arcface.yaml": {
        "backbone.name": "iresnet100",
        "backbone.embedding_size": 512,
        "head.name": "subcenter_arcface",
        "head.params": {"s": 64.0, "m": 0.5, "k": 3},
        "partial_fc.sample_rate": 1.0,
        "optim.name": "sgd",
        "optim.lr": 0.1,
        "optim.momentum": 0.9,
        "optim.weight_decay": 5e-4,
        "global_batch": 1024,
    },
    # Fine-tuning a released backbone (docs/real_data.md): imported weights, a new head.
    "finetune_pretrained_mobilefacenet.yaml": {
        "backbone.name": "mobilefacenet",
        "backbone.embedding_size": 512,
        "backbone.init_weights": "data/realfaces/mobilefacenet_512.safetensors",
        "backbone.freeze_stages": 3,
        "backbone.freeze_bn": True,
        "head.name": "arcface",
        "optim.lr": 0.05,
        "optim.backbone_lr_scale": 0.01,
        "partial_fc.lr_scale": 1.0,
        "data.num_classes": 0,
        "eval.at_start": True,
        "eval.targets": ["data/realfaces/photos.bin"],
    },
}


def test_every_recipe_is_listed():
    assert set(CONFIGS) == set(EXPECTED), "a recipe config without expectations, or missing"


# The margin heads whose recipe follows their paper (docs/heads.md): every head registered by
# these modules, so that a new one there needs a recipe.
PAPER_HEAD_MODULES = ("heads.margins_adaptive", "heads.margins_magnitude")


def test_every_paper_head_has_a_recipe_with_the_defaults_as_its_values():
    import inspect

    import heads

    paper_heads = [
        n
        for n in heads.HEADS.names(kind="margin")
        if heads.HEADS.get(n).__module__ in PAPER_HEAD_MODULES
    ]
    assert {"adaface", "magface", "curricularface", "subcenter_arcface"} <= set(paper_heads)
    by_head = {}
    for name in CONFIGS:
        cfg = _cfg(name)
        by_head.setdefault(cfg.head.name, []).append(cfg)
    for head in paper_heads:
        assert head in by_head, f"no recipe in {RECIPES} trains {head}"
        builder = heads.HEADS.get(head)
        defaults = {
            k: p.default
            for k, p in inspect.signature(builder).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        for cfg in by_head[head]:
            # the registered defaults are the paper's values, and so are the recipe's
            assert cfg.head.params, head
            for key, value in cfg.head.params.items():
                assert value == pytest.approx(defaults[key]), (head, key)


@pytest.mark.parametrize("name", CONFIGS)
def test_recipe_config_loads_and_states_the_report_values(name):
    import backbones
    from dist_train.losses import build_head

    cfg = _cfg(name)
    assert cfg.backbone.name in backbones.names()
    params = {k: v for k, v in cfg.head.params.items() if not k.startswith("center_loss_")}
    head = build_head(cfg.head.name, params, cfg.data.num_classes or 1000)
    if head.kind == "metric":  # metric losses need several images of each class per batch
        assert cfg.data.sampler == "m_per_class"
        assert cfg.data.batch_size % cfg.data.m_per_class == 0
    if cfg.head.name == "angleproto":
        assert head.m_per_class == cfg.data.m_per_class
    for key, want in EXPECTED[name].items():
        if key == "global_batch":
            got = cfg.data.batch_size * cfg.grad_accum_steps * _nproc(name)
        else:
            got = _get(cfg, key)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-4), key
        else:
            assert got == want, key
    assert cfg.output_dir == f"runs/{name[:-5]}"
    if cfg.eval.best_metric:
        stems = [Path(t).name.rsplit(".", 1)[0] for t in cfg.eval.targets]
        assert cfg.eval.best_metric.split("/")[0] in stems


def test_docs_give_a_torchrun_and_an_sbatch_line_per_recipe():
    text = (REPO / "docs" / "recipes.md").read_text()
    for name in CONFIGS:
        path = f"launch/configs/recipes/{name}"
        torchrun = [ln for ln in text.splitlines() if "torchrun" in ln and path in ln]
        sbatch = [ln for ln in text.splitlines() if "sbatch" in ln and path in ln]
        assert torchrun and sbatch, f"docs/recipes.md has no torchrun/sbatch line for {name}"
        assert any(f"--nproc_per_node={_nproc(name)}" in ln for ln in torchrun), name
    for script in re.findall(r"launch/slurm/[\w.]+", text):
        assert (REPO / script).is_file(), script


# ------------------------------------------------------------------------------------------
# Tiny data


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> dict[str, Path]:
    """``pre``: 16 identities x 8 images RecordIO pack (32x32) with val pairs; ``korean``: the
    fine-tuning layout (``train/<identity>/*.jpg`` with 8 new identities x 4 images,
    ``val.csv`` and ``test.csv`` over held-out identities)."""
    from dist_train.data.synthetic import SyntheticSpec, make_synthetic

    root = tmp_path_factory.mktemp("recipes")
    pre = root / "pre"
    make_synthetic(
        pre,
        SyntheticSpec(
            num_identities=16,
            images_per_identity=8,
            val_identities=6,
            val_images_per_identity=4,
            val_pairs=40,
            image_size=32,
            seed=11,
        ),
    )
    b, c = root / "b", root / "c"
    make_synthetic(
        b,
        SyntheticSpec(
            num_identities=2,
            images_per_identity=1,
            val_identities=8,
            val_images_per_identity=4,
            val_pairs=2,
            image_size=32,
            seed=12,
        ),
    )
    make_synthetic(
        c,
        SyntheticSpec(
            num_identities=2,
            images_per_identity=1,
            val_identities=6,
            val_images_per_identity=4,
            val_pairs=40,
            image_size=32,
            seed=13,
        ),
    )
    korean = root / "korean"
    shutil.copytree(b / "val_images", korean / "train")
    shutil.copytree(c / "val_images", korean / "val_images")
    lines = [ln for ln in (c / "val_pairs.csv").read_text().splitlines() if ln.strip()]
    (korean / "val.csv").write_text("\n".join(lines[:20]) + "\n")
    (korean / "test.csv").write_text("\n".join(lines[20:]) + "\n")
    return {"pre": pre, "korean": korean}


def _small(data: Path, run: Path, val: Path, **extra) -> list[str]:
    """Overrides that shrink a recipe to 2 steps on tiny data (nothing else changes)."""
    sets = {
        "output_dir": run,
        "data.root": data,
        "data.format": "auto",
        "data.num_classes": 0,
        "data.image_size": 32,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "amp": "none",
        "max_steps": 2,
        "log_every_steps": 1,
        "tensorboard": False,
        "checkpoint.at_epoch_end": False,
        "backbone.init_weights": "",
        "eval.targets": f"[{val}]",
        "eval.best_metric": f"{val.stem}/eer",
        "eval.test_targets": "[]",
        "eval.batch_size": 32,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


_TINY = {"backbone.name": "_test_tinyconv", "backbone.params": "{}"}
_TEACHER_PARAMS = "width_mult: 0.25, input_size: 32"


def _save_teacher(path: Path) -> Path:
    """A freshly built iResNet-50 (quarter width, 32x32, 512-d) saved as a teacher weights file."""
    import backbones

    torch.manual_seed(7)
    net = backbones.get_backbone("iresnet50", embedding_size=512, width_mult=0.25, input_size=32)
    # BatchNorm statistics of its own activations (fresh ones make a deep net in eval mode blow
    # up its embeddings to ~1e9), as a trained teacher's would be
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        net.train()(torch.randn(32, 3, 32, 32))
    torch.save(net.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------
# Distributed workers (module level: pickled by the spawn start method)


def _describe(trainer) -> dict:
    loss = trainer.loss
    return {
        "backbone": type(trainer.backbone).__name__,
        "margin": type(loss.partial_fc.margin).__name__ if loss.partial_fc else None,
        "metric": type(loss.metric.head).__name__ if loss.metric else None,
        "center": loss.center is not None,
        "sampler": type(trainer.data.sampler).__name__,
        "num_classes": trainer.num_classes,
        "teacher": type(trainer.distill.teacher).__name__ if trainer.distill else None,
    }


def _fit_recording(trainer) -> tuple[list[float], list[tuple[str, int]]]:
    """Runs ``fit()``, recording each step's loss and each evaluation's (tag, step)."""
    losses, evals = [], []

    def recording_evaluate(tag, results):
        evals.append((tag, trainer.step))

    trainer.fit(on_step=losses.append, on_evaluate=recording_evaluate)
    return losses, evals


def _run_recipes(rank, world, runs):
    import tests.conftest  # noqa: F401 - registers the tiny test backbone in this process
    from dist_train.distributed import current_info
    from dist_train.trainer import Trainer

    out = {}
    for key, name, overrides in runs:
        trainer = Trainer(_cfg(name, overrides), current_info())
        losses, _ = _fit_recording(trainer)
        out[key] = {**_describe(trainer), "losses": losses, "metrics": trainer.last_metrics}
    return out


def _two_stage(rank, world, stage1, stage2):
    from dist_train.distributed import current_info
    from dist_train.trainer import Trainer

    t1 = Trainer(_cfg(*stage1), current_info())
    losses1, _ = _fit_recording(t1)
    pre = torch.load(Path(t1.cfg.output_dir) / "model.pt", weights_only=True)
    t2 = Trainer(_cfg(*stage2), current_info())
    loaded = all(torch.equal(v, pre[k]) for k, v in t2.backbone.state_dict().items())
    losses2, evals = _fit_recording(t2)
    stem = t2.backbone.stages()[0]
    params = dict(t2.backbone.named_parameters())
    stem_ids = {id(p) for p in stem.parameters()}
    frozen_same = all(
        torch.equal(p.detach(), pre[n]) for n, p in params.items() if id(p) in stem_ids
    )
    others_moved = any(
        not torch.equal(p.detach(), pre[n]) for n, p in params.items() if id(p) not in stem_ids
    )
    return {
        "stage1": {**_describe(t1), "losses": losses1},
        "stage2": {
            **_describe(t2),
            "losses": losses2,
            "evals": evals,
            "steps_per_epoch": t2.steps_per_epoch,
        },
        "loaded": loaded,
        "stem_params": len(stem_ids),
        "frozen_same": frozen_same,
        "others_moved": others_moved,
    }


# ------------------------------------------------------------------------------------------
# Every recipe, 2 steps on 2 ranks


@pytest.fixture(scope="module")
def recipe_runs(recipe_data, tmp_path_factory):
    pre, korean = recipe_data["pre"], recipe_data["korean"]
    val = pre / "val_pairs.csv"
    runs_dir = tmp_path_factory.mktemp("recipe_runs")

    def run(key, name, data=pre, **extra):
        return key, name, _small(data, runs_dir / key, val, **extra)

    runs = [
        # Recipe 1 (stage 2, M = 4, tiny backbone); stage 1 and M = 2 run in the two-stage test.
        run(
            "korean_m4",
            "korean_finetune_angleproto_m4.yaml",
            korean / "train",
            **_TINY,
            **{"data.format": "folder"},
        ),
        # Recipe 1's documented AM-softmax + prototypical variant (a combined head).
        run(
            "korean_amsoftmax_proto",
            "korean_finetune_angleproto_m2.yaml",
            korean / "train",
            **_TINY,
            **{
                "data.format": "folder",
                "head.name": "amsoftmax_proto",
                "head.params": "{s: 30.0, m: 0.1, m_per_class: 2}",
            },
        ),
        # Recipe 2: the real iResNet-50 at quarter width and 32x32 input; identity ratio 0.5;
        # the real EfficientNet-B3 at 32x32 with the low-light evaluation.
        run(
            "casia_iresnet50",
            "casia_iresnet50_arcface.yaml",
            **{
                "backbone.params": "{width_mult: 0.25, input_size: 32}",
                "data.identity_ratio": 0.5,
                "data.center_crop": 28,
            },
        ),
        run(
            "casia_efficientnet_b3",
            "casia_efficientnet_b3_arcface.yaml",
            **{"data.center_crop": 28, "eval.low_light": True},
        ),
        # Recipe 3: the real ResNet50 once, the other losses on the tiny backbone.
        run("asian_normface", "asian_resnet50_normface.yaml"),
        run("asian_intra_angle", "asian_resnet50_intra_angle.yaml", **_TINY),
        run("asian_arcface_60deg", "asian_resnet50_arcface_60deg.yaml", **_TINY),
        # Recipe 4 (ResNet50 is covered by recipe 3).
        run("lfw_contrastive", "lfw_resnet50_contrastive.yaml", **_TINY),
        run("lfw_contrastive_semihard", "lfw_resnet50_contrastive_semihard.yaml", **_TINY),
        run("lfw_margin", "lfw_resnet50_margin.yaml", **_TINY),
        run("lfw_arcface_adacos", "lfw_resnet50_arcface_adacos.yaml", **_TINY),
        # Recipe 5: the real ResNet34 once (no best metric: the test set uses final weights).
        run(
            "r34_softmax",
            "vggface2_resnet34_softmax.yaml",
            **{"eval.best_metric": "", "eval.test_targets": f"[{pre / 'val.bin'}]"},
        ),
        run("r34_center", "vggface2_resnet34_center.yaml", **_TINY),
        run("r34_arcface", "vggface2_resnet34_arcface.yaml", **_TINY),
        # The ViT recipe with the real vit_t at 32x32 (3x3 patches of 9): as shipped (no
        # masking, the unused mask token frozen) and with patch masking on under DDP.
        run(
            "vit_t_cosface",
            "webface42m_vit_t_cosface.yaml",
            **{"backbone.params": "{input_size: 32, drop_path_rate: 0.05, mask_ratio: 0.0}"},
        ),
        run(
            "vit_t_cosface_masked",
            "webface42m_vit_t_cosface.yaml",
            **{"backbone.params": "{input_size: 32, mask_ratio: 0.1}"},
        ),
        # Distillation: the real MobileFaceNet at 32x32, taught by a freshly built iResNet-50 at
        # quarter width saved as the teacher's weights file.
        run(
            "distill_mobilefacenet",
            "distill_iresnet50_to_mobilefacenet.yaml",
            **{
                "backbone.params": "{input_size: 32}",
                "distill.teacher.params": f"{{{_TEACHER_PARAMS}}}",
                "distill.teacher.weights": _save_teacher(runs_dir / "teacher.pt"),
            },
        ),
        # The paper-head recipes: the real iResNet-100 at quarter width and 32x32 once (AdaFace,
        # whose margin needs the embeddings' norms), the other heads on the tiny backbone.
        run(
            "ms1mv2_adaface",
            "ms1mv2_iresnet100_adaface.yaml",
            **{"backbone.params": "{width_mult: 0.25, input_size: 32}"},
        ),
        run("ms1mv2_magface", "ms1mv2_iresnet100_magface.yaml", **_TINY),
        run("ms1mv2_curricularface", "ms1mv2_iresnet100_curricularface.yaml", **_TINY),
        run("ms1mv2_elasticface_arc", "ms1mv2_iresnet100_elasticface_arc.yaml", **_TINY),
        run("ms1mv2_elasticface_cos", "ms1mv2_iresnet100_elasticface_cos.yaml", **_TINY),
        run("ms1mv0_subcenter_arcface", "ms1mv0_iresnet100_subcenter_arcface.yaml", **_TINY),
        # Fine-tuning a released model: the real MobileFaceNet at quarter width, 32x32, with
        # its frozen stages and BatchNorm (tests/test_finetune.py loads imported weights).
        run(
            "finetune_mobilefacenet",
            "finetune_pretrained_mobilefacenet.yaml",
            **{"backbone.params": "{input_size: 32, width_mult: 0.25}"},
        ),
    ]
    results = run_distributed(_run_recipes, 2, runs, timeout_s=400)
    return results, {key: runs_dir / key for key, _, _ in runs}


_WANT = {
    "korean_m4": ("TinyConvNet", None, "AngleProtoLoss", "MPerClassSampler"),
    "korean_amsoftmax_proto": ("TinyConvNet", "CosFace", "AMSoftmaxProto", "MPerClassSampler"),
    "casia_iresnet50": ("IResNet", "ArcFace", None, "IdentityRatioSampler"),
    "casia_efficientnet_b3": ("EfficientNet", "ArcFace", None, "IdentityRatioSampler"),
    "asian_normface": ("ResNet", "NormFace", None, None),
    "asian_intra_angle": ("TinyConvNet", "NormFace", None, None),
    "asian_arcface_60deg": ("TinyConvNet", "ArcFace", None, None),
    "lfw_contrastive": ("TinyConvNet", None, "ContrastiveLoss", "MPerClassSampler"),
    "lfw_contrastive_semihard": ("TinyConvNet", None, "ContrastiveLoss", "MPerClassSampler"),
    "lfw_margin": ("TinyConvNet", None, "MarginLoss", "MPerClassSampler"),
    "lfw_arcface_adacos": ("TinyConvNet", "ArcFace", None, None),
    "r34_softmax": ("ResNet", "SoftmaxHead", None, None),
    "r34_center": ("TinyConvNet", "SoftmaxHead", None, None),
    "r34_arcface": ("TinyConvNet", "ArcFace", None, None),
    "vit_t_cosface": ("VisionTransformer", "CosFace", None, None),
    "vit_t_cosface_masked": ("VisionTransformer", "CosFace", None, None),
    "distill_mobilefacenet": ("MobileFaceNet", "ArcFace", None, None),
    "finetune_mobilefacenet": ("MobileFaceNet", "ArcFace", None, None),
    "ms1mv2_adaface": ("IResNet", "AdaFace", None, None),
    "ms1mv2_magface": ("TinyConvNet", "MagFace", None, None),
    "ms1mv2_curricularface": ("TinyConvNet", "CurricularFace", None, None),
    "ms1mv2_elasticface_arc": ("TinyConvNet", "ElasticFace", None, None),
    "ms1mv2_elasticface_cos": ("TinyConvNet", "ElasticFace", None, None),
    "ms1mv0_subcenter_arcface": ("TinyConvNet", "SubCenterArcFace", None, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(_WANT))
def test_recipe_trains_on_two_ranks(recipe_runs, key):
    results, run_dirs = recipe_runs
    r0, r1 = results[0][key], results[1][key]
    backbone, margin, metric, sampler = _WANT[key]
    assert (r0["backbone"], r0["margin"], r0["metric"]) == (backbone, margin, metric)
    if sampler is not None:
        assert r0["sampler"] == sampler
    assert r0["center"] == (key == "r34_center")
    assert r0["teacher"] == ("IResNet" if key == "distill_mobilefacenet" else None)
    assert len(r0["losses"]) == 2 and all(math.isfinite(v) for v in r0["losses"])
    # the loss is the global-batch loss: the same value on both ranks
    assert r0["losses"] == pytest.approx(r1["losses"], rel=1e-5, abs=1e-6)
    m = r0["metrics"]["val_pairs"]
    assert 0.0 <= m["eer"] <= 1.0 and 0.0 <= m["auc"] <= 1.0 and "best_f1" in m
    # every rank returns the same evaluation (NaN, e.g. TAR@FAR=1e-3 on 20 impostor pairs, too)
    assert json.dumps(r0["metrics"], sort_keys=True) == json.dumps(r1["metrics"], sort_keys=True)
    run_dir = run_dirs[key]
    assert (run_dir / "model.pt").is_file()
    assert (run_dir / "best_model.pt").is_file() == (key != "r34_softmax")


@pytest.mark.slow
def test_test_targets_use_final_weights_without_a_best_metric(recipe_runs):
    import backbones
    from eval.runner import evaluate_targets

    _, run_dirs = recipe_runs
    run_dir = run_dirs["r34_softmax"]
    report = json.loads((run_dir / "metrics_test.json").read_text())
    assert report["source"]["weights"] == str(run_dir / "model.pt")
    assert report["source"]["step"] == 2
    cfg = load_config(run_dir / "config.yaml")
    net = backbones.get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size)
    net.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    want = evaluate_targets(net, cfg.eval.test_targets, batch_size=32)
    assert report["metrics"]["val"]["eer"] == pytest.approx(want["val"]["eer"], abs=1e-6)
    assert report["metrics"]["val"]["accuracy"] == pytest.approx(want["val"]["accuracy"], abs=1e-6)


# ------------------------------------------------------------------------------------------
# Two-stage: VGGFace2-style pretraining -> Korean-style fine-tuning with the test EER


@pytest.mark.slow
def test_two_stage_pretrain_then_finetune(recipe_data, tmp_path):
    import backbones
    from eval.runner import evaluate_targets

    pre, korean = recipe_data["pre"], recipe_data["korean"]
    s1, s2 = tmp_path / "pretrain", tmp_path / "finetune"
    stage1 = (
        "vggface2_thinresnet50v2_amsoftmax.yaml",
        _small(
            pre,
            s1,
            pre / "val_pairs.csv",
            **{
                "data.max_images_per_identity": 4,
                "data.color_jitter": 0.7,
                "eval.best_metric": "",
            },
        ),
    )
    stage2 = (
        "korean_finetune_angleproto_m2.yaml",
        _small(
            korean / "train",
            s2,
            korean / "val.csv",
            **{
                "data.format": "folder",
                "backbone.init_weights": s1 / "model.pt",
                "backbone.freeze_stages": 1,
                "max_steps": 0,
                "num_epochs": 2,
                "eval.best_metric": "val/eer",
                "eval.test_targets": f"[{korean / 'test.csv'}]",
            },
        ),
    )
    out = run_distributed(_two_stage, 2, stage1, stage2, timeout_s=400)[0]
    one, two = out["stage1"], out["stage2"]
    # a new head on a different set of identities, starting from the stage-1 backbone
    assert (one["backbone"], one["margin"], one["sampler"]) == (
        "ThinResNet",
        "CosFace",
        "IdentityCapSampler",
    )
    assert (two["backbone"], two["metric"], two["margin"]) == ("ThinResNet", "AngleProtoLoss", None)
    assert (one["num_classes"], two["num_classes"]) == (16, 8)
    assert out["loaded"], "stage 2 did not start from the stage-1 weights"
    assert out["stem_params"] > 0 and out["frozen_same"], "frozen stem changed"
    assert out["others_moved"], "the unfrozen stages did not train"
    # validation after every epoch (the last epoch's is the final evaluation)
    spe = two["steps_per_epoch"]
    assert spe == 2 and len(two["losses"]) == 2 * spe
    assert [s for tag, s in two["evals"] if tag == ""] == [spe, 2 * spe]
    # the test EER is that of best_model.pt, chosen by the validation EER
    best = json.loads((s2 / "best_model.json").read_text())
    assert best["best_metric"] == "val/eer" and best["step"] in (spe, 2 * spe)
    report = json.loads((s2 / "metrics_test.json").read_text())
    assert report["source"]["weights"] == str(s2 / "best_model.pt")
    assert report["source"]["step"] == best["step"] and report["source"]["epoch"] == best["epoch"]
    net = backbones.get_backbone("thin_resnet50_v2", embedding_size=512)
    net.load_state_dict(torch.load(s2 / "best_model.pt", weights_only=True))
    want = evaluate_targets(net, [str(korean / "test.csv"), str(korean / "val.csv")], batch_size=32)
    assert report["metrics"]["test"]["eer"] == pytest.approx(want["test"]["eer"], abs=1e-6)
    # the validation EER that selected it is that of best_model.pt too (every rank embedded
    # its shard of the images with rank 0's BatchNorm statistics)
    assert best["value"] == pytest.approx(want["val"]["eer"], abs=1e-6)
    assert "test (" in (s2 / "train.log").read_text()
