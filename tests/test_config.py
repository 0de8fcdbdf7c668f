"""Run configuration: defaults, the shipped configs, overrides and errors naming file, line and key."""

import dataclasses
from pathlib import Path

import pytest

from score.rl.config import ConfigError, RunConfig, config_from_dict, describe_config, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_every_field_has_help_and_default():
    cfg = RunConfig()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f.metadata["help"], f"{section.name}.{f.name} has no help"
            assert f.default is not dataclasses.MISSING
    text = describe_config()
    assert "[optim]" in text and "lr = 5e-06" in text


@pytest.mark.parametrize("name", ["demo.toml", "math_qwen2.5_1.5b.toml", "code_mbpp_humaneval.toml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.total_steps > 0


def test_paper_hyperparameters_in_math_config():
    cfg = load_config(CONFIGS / "math_qwen2.5_1.5b.toml")
    assert (cfg.score.alpha, cfg.score.beta1, cfg.score.beta2) == (10.0, 0.01, 0.1)
    assert cfg.optim.lr == 5e-6 and cfg.rollout.temperature == 1.0
    assert cfg.reward.kind == "math"
    assert load_config(CONFIGS / "code_mbpp_humaneval.toml").reward.kind == "code"


def test_values_and_overrides(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 1e-3\n[score]\nalpha = 3\n")
    cfg = load_config(path, ["optim.schedule=cosine", "rollout.samples_per_prompt=8", "optim.lr=2e-4"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.schedule == "cosine"
    assert cfg.score.alpha == 3.0 and isinstance(cfg.score.alpha, float)
    assert cfg.rollout.samples_per_prompt == 8 and cfg.model.master_dtype == "float32"


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("[optim]\nlr = 1e-3\nlrr = 2\n", 3, ["optim.lrr", "unknown key"]),
        ("[optim]\n\n[bogus]\nx = 1\n", 3, ["unknown section [bogus]"]),
        ("[rollout]\nsamples_per_prompt = 1\n", 2, ["rollout.samples_per_prompt", ">= 2", "got 1"]),
        ('[optim]\nlr = "fast"\n', 2, ["optim.lr", "finite number"]),
        ('[score]\nkl_placement = "loss"\n', 2, ["score.kl_placement", "kl_in_reward"]),
        ("[run]\nseed = 1.5\n", 2, ["run.seed", "integer"]),
        ("[model]\nactivation_checkpointing = 1\n", 2, ["true or false"]),
        ('[model]\nkernels = "cuda"\n', 2, ["model.kernels", "'triton'"]),
        # keys of earlier versions whose meaning changed are refused with what replaced them
        (
            "[model]\npath = 'm'\nautocast_bf16 = true\n",
            3,
            ["model.autocast_bf16 is no longer a key", "model.autocast"],
        ),
        ('[model]\ndtype = "bfloat16"\n', 2, ["model.dtype is no longer a key", "model.master_dtype"]),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:{line}" in msg
    for w in words:
        assert w in msg


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="line 2"):
        load_config(write(tmp_path, "[optim]\nlr = = 3\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_retired_key_in_an_override_names_its_replacement(tmp_path):
    with pytest.raises(ConfigError, match="model.autocast = 'auto'"):
        load_config(write(tmp_path, ""), ["model.autocast_bf16=false"])


def test_bad_override(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match="section.key"):
        load_config(path, ["lr=3"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(path, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="unknown key optim.nope"):
        config_from_dict({"optim": {"nope": 1}})
