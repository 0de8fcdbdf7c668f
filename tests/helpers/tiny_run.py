"""A tiny random-weight base model, tokenizer and problem files for trainer/CLI tests (no downloads)."""

import json
from pathlib import Path

import torch

from score.model import save_pretrained
from score.rl.config import config_from_dict
from score.rl.demo import task as demo_task
from score.rl.demo.base_model import build_model, build_tokenizer
from score.rl.demo.settings import DEMO_RL, QUICK


def make_base(root: Path, seed: int = 0):
    """Save a tiny untrained decoder + BPE tokenizer under root/base; returns (model, tokenizer, path)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(300, seed)
    model = build_model(tokenizer, QUICK)
    base = root / "base"
    save_pretrained(model, base)
    tokenizer.save_pretrained(base)
    return model, tokenizer, base


def write_problems(path: Path, n: int, split: str = "train", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in demo_task.problems(n, split, seed):
            f.write(json.dumps({"id": p.id, "problem": p.question, "answer": p.answer}) + "\n")
    return path


def edit_json(path: Path, **changes):
    """Rewrite a JSON file (a model's config.json) with keys set, or removed where the value is None."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def tiny_config(root: Path, **overrides):
    """A 2+2-step run on the tiny model: 2 prompts x 2 samples per step, short attempts."""
    if not (root / "base").exists():
        make_base(root)
    train = write_problems(root / "train.jsonl", 16)
    raw = json.loads(json.dumps(DEMO_RL))
    raw["model"]["path"] = str(root / "base")
    raw["data"].update(train=str(train), eval="")
    raw["score"].update(stage1_steps=2, stage2_steps=2)
    raw["optim"].update(prompts_per_step=2, prompts_per_micro_batch=1, lr=1e-2, warmup_steps=1)
    raw["rollout"].update(samples_per_prompt=2, max_tokens_attempt1=4, max_tokens_attempt2=4)
    raw["run"].update(checkpoint_every=2, plots=False, progress=False)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, source="test")


class ParityReward:
    """A deterministic stand-in for a checker that an untrained model can pass: even-length answers."""

    def __call__(self, texts, problems):
        return [float(len(t) % 2 == 0) for t in texts]

    def close(self):
        pass


def trainer_with_parity(cfg, out, **kw):
    """A Trainer (any Trainer keyword, e.g. parallel=) rewarded by ParityReward."""
    from score.rl.trainer import Trainer

    t = Trainer(cfg, out, **kw)
    t.reward.close()
    t.reward = ParityReward()
    return t


def write_run_config(root: Path, **overrides) -> Path:
    """`tiny_config(root, **overrides)` as the TOML file root/run.toml (what `score train --config` reads)."""
    from score.rl.config import to_toml

    path = root / "run.toml"
    path.write_text(to_toml(tiny_config(root, **overrides)))
    return path
