"""Training configs: every shipped config loads, unknown keys are rejected by name, overrides parse as TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from sana.errors import ConfigError
from sana.models.transformer import TRANSFORMER_PRESETS
from sana.train import config as config_module
from sana.train.config import (
    DataSource,
    LRSchedule,
    OptimizerKind,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_override,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "train").glob("*.toml"))
EXPECTED = {
    "tiny.toml",
    "sana-600m-512.toml",
    "sana-600m-1024.toml",
    "sana-1600m-1024.toml",
    "finetune-600m-1024.toml",
    "lora-600m-1024.toml",
}


def test_all_expected_configs_are_shipped():
    assert EXPECTED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    if path.name != "tiny.toml":
        assert cfg.model.preset in TRANSFORMER_PRESETS
        assert cfg.data.source is DataSource.FOLDER
        assert cfg.logging.validation_prompts


def test_released_recipe_values():
    cfg = load_config(CONFIGS[0].parent / "sana-600m-1024.toml")
    assert cfg.loss.flow_shift == 4.0  # 600M@1024 (reference section 5)
    assert cfg.optim.optimizer is OptimizerKind.CAME and cfg.optim.lr == 1e-4 and cfg.optim.grad_clip == 0.1
    assert cfg.schedule.warmup_steps == 2000 and cfg.schedule.lr_schedule is LRSchedule.CONSTANT
    lora = load_config(CONFIGS[0].parent / "lora-600m-1024.toml")
    assert lora.model.lora_rank == 4 and lora.model.init_from


def test_tiny_config_values():
    cfg = load_config(CONFIGS[0].parent / "tiny.toml")
    assert cfg.model.arch.hidden_size == 32 and cfg.model.arch.depth == 2
    assert cfg.data.source is DataSource.SYNTHETIC


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


BASE = '[model.arch]\nhidden_size = 32\nlinear_head_dim = 8\ncross_heads = 2\n[data]\nsource = "synthetic"\n'


@pytest.mark.parametrize(
    "extra, named",
    [
        ("lernrate = 1\n", "lernrate"),  # top level
        ("[optim]\nlrr = 1e-4\n", "lrr"),
        ("[schedule]\nmax_step = 3\n", "max_step"),
        ("[bogus]\nx = 1\n", "bogus"),
    ],
)
def test_unknown_keys_are_rejected_by_name(tmp_path, extra, named):
    text = extra + BASE if not extra.startswith("[") else BASE + extra
    with pytest.raises(ConfigError, match=named):
        load_config(_write(tmp_path, text))


def test_unknown_key_in_nested_arch_and_override(tmp_path):
    path = _write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="depthh"):
        load_config(path, ["model.arch.depthh=2"])
    with pytest.raises(ConfigError, match=r"\[optim\].*'lrr'"):
        load_config(path, ["optim.lrr=0.1"])


def test_overrides_parse_as_toml_literals(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(
        path,
        [
            "optim.lr=3e-4",
            "optim.betas=[0.9, 0.99, 0.999]",
            "model.gradient_checkpointing=true",
            "schedule.lr_schedule=cosine",  # bare string
            'output_dir="runs/x y"',
            "data.path=/data/my images",  # bare string with a space
            "seed = 7",
        ],
    )
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.99, 0.999)
    assert cfg.model.gradient_checkpointing is True
    assert cfg.schedule.lr_schedule is LRSchedule.COSINE
    assert cfg.output_dir == "runs/x y" and cfg.data.path == "/data/my images" and cfg.seed == 7


def test_parse_override_errors():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    for bad in ("a.b", "=1", "a..b=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "lr"),
        ("optim.betas=[0.9, 0.99]", "3 betas"),  # CAME takes three
        ("optim.optimizer=sgd", "sgd"),
        ("data.resolution=100", "resolution"),
        ("loss.caption_dropout=1.5", "caption_dropout"),
        ("optim.lr=fast", "lr"),  # a string where a number goes
        ('model.preset="sana-600m-1024"', "exclusive"),
        ("logging.validation_every=10", "validation"),
        ("data.source=folder", "path"),
        ("model.arch.guidance_embeds=true", "Sprint"),
        ("seed=-1", "seed"),
    ],
)
def test_invalid_values_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE), [override])


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "a = = 1"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_without_a_toml_reader_the_error_names_tomli(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "_toml", None)
    with pytest.raises(ConfigError, match="tomli"):
        load_config(_write(tmp_path, BASE))
