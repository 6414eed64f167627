import pytest

from dist_train.config import ConfigError, TrainConfig, load_config, save_config


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
    from pathlib import Path

    configs = sorted(Path("launch/configs").glob("*.yaml"))
    assert configs, "no shipped configs"
    for path in configs:
        load_config(path)
