from pathlib import Path

import pytest

import backbones
import heads
from dist_train.config import (
    CENTER_LOSS_PARAMS,
    ConfigError,
    TrainConfig,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"


def test_defaults_and_overrides_convert_types(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  lr: 1e-3\n  name: adamw\ndata:\n  batch_size: 32\n")
    cfg = load_config(cfg_file, ["data.batch_size=8", "eval.targets=a.bin,b.csv", "amp=bf16"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.name == "adamw"
    assert cfg.data.batch_size == 8  # CLI beats YAML
    assert cfg.eval.targets == ["a.bin", "b.csv"]
    assert cfg.amp == "bf16"
    assert cfg.scheduler.name == "poly"  # default kept


def test_unknown_key_names_dotted_path_and_closest(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*optim\.lr"):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match=r"data\.batchsize.*data\.batch_size"):
        load_config(None, ["data.batchsize=3"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lr=abc", r"optim\.lr"),
        ("data.batch_size=1.5", r"data\.batch_size"),
        ("amp=fp8", r"amp"),
        ("partial_fc.sample_rate=0", r"partial_fc\.sample_rate"),
        ("optim.name=sgdd", r"did you mean 'sgd'"),
        ("data=3", r"data must be a mapping"),
    ],
)
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.05", "head.params={s: 30.0, m: 0.1}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.head.params == {"s": 30.0, "m": 0.1}


def test_shipped_configs_load():
    configs = sorted(CONFIGS.rglob("*.yaml"))  # recipes/ included
    assert configs, "no shipped configs"
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    "override,match",
    [
        (
            "head.params={s: 30.0, intra_alpah: 0.5}",
            r"head\.params\.intra_alpah.*head\.params\.intra_alpha",
        ),
        (
            "head.params.center_loss_wieght=0.01",
            r"head\.params\.center_loss_wieght.*center_loss_weight",
        ),
        ("head.params.center_loss_update=gradeint", r"center_loss_update.*did you mean 'gradient'"),
        (
            "backbone.params={width_mul: 0.5}",
            r"backbone\.params\.width_mul.*backbone\.params\.width_mult",
        ),
        ("backbone.params={embedding_size: 8}", r"set backbone\.embedding_size instead"),
        ("head.params={s: abc}", r"head\.params\.s='abc' is not a valid float"),
        ("head.name=arcfce", r"head\.name='arcfce'.*did you mean 'arcface'"),
        ("backbone.name=iresnet5", r"backbone\.name='iresnet5'.*did you mean 'iresnet50'"),
    ],
)
def test_params_keys_are_the_builders_keywords(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["backbone.name=iresnet18", override])


def test_params_accept_builder_keywords_and_center_loss_keys():
    cfg = load_config(
        None,
        [
            "backbone.params={input_size: 64, width_mult: 0.25}",
            "head.name=softmax",
            "head.params={s: '1e0', center_loss_weight: 0.003, center_loss_update: alpha}",
        ],
    )
    assert cfg.backbone.params == {"input_size": 64, "width_mult": 0.25}
    # a string number (PyYAML reads 1e0 as one) is converted by the builder's declared type
    assert cfg.head.params == {"s": 1.0, "center_loss_weight": 0.003, "center_loss_update": "alpha"}
    assert set(CENTER_LOSS_PARAMS) == {
        "center_loss_weight",
        "center_loss_update",
        "center_loss_alpha",
        "center_loss_lr_scale",
        "center_loss_centers_dtype",
        "center_loss_state_dtype",
    }


@pytest.mark.parametrize(
    "registry,name",
    [(backbones.BACKBONES, n) for n in backbones.names()]
    + [(heads.HEADS, n) for n in heads.names()],
)
def test_every_builder_lists_its_keywords(registry, name):
    """A builder taking **kwargs would let a typo in its params through unchecked."""
    assert registry.keywords(name) is not None
