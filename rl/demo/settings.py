"""What each demo run is: the RL settings (configs/demo.toml holds the same), the paper's ablations
(METHODS) and baselines (SFT_BASELINES) as changes of them, the model and warm-up sizes, and
`demo_config`, the config of one run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, config_from_dict
from . import task as demo_task

# The RL settings of the demo (configs/demo.toml holds the same, for `score train`).
DEMO_RL = {
    "model": {"master_dtype": "float32", "device": "cpu"},
    "data": {"question_key": "problem", "answer_key": "answer", "id_key": "id"},
    "prompt": {"chat": False, "system_prompt": "", "correction_instruction": demo_task.CORRECTION_INSTRUCTION},
    "reward": {"kind": "exact"},
    "rollout": {
        "samples_per_prompt": 4,
        "temperature": 1.0,
        "max_tokens_attempt1": 4,
        "max_tokens_attempt2": 24,
        "max_num_seqs": 256,
    },
    "score": {"stage1_steps": 25, "stage2_steps": 75, "alpha": 10.0, "beta1": 0.01, "beta2": 0.1},
    "optim": {
        "lr": 2e-4,
        "warmup_steps": 3,
        "schedule": "constant",
        "grad_clip": 1.0,
        "prompts_per_step": 32,
        "prompts_per_micro_batch": 32,
    },
    "run": {"checkpoint_every": 0, "keep_last": 1, "plots": False, "progress": False},
}


# The paper's Table 4 rows, each a change of the [score] section with the same budget of steps
# (demo_config moves Stage I's steps into Stage II for the methods without Stage I).
METHODS = {
    "score": ("SCoRe", {}),
    "multi_turn_rl": ("multi-turn RL", {"stage1_steps": 0, "alpha": 0.0}),
    "single_turn": ("single-turn RL", {"single_turn": True, "stage1_steps": 0}),
    "no_stage1": ("w/o Stage I", {"stage1_steps": 0}),
    "no_shaping": ("w/o reward shaping", {"alpha": 0.0}),
    "star_stage2": ("STaR in Stage II", {"stage2_update": "star"}),
    "offline_turn1": ("w/o online turn-1 samples", {"online_first_attempt": False}),
}


# The paper's baselines (Tables 1-2): a prompting one on the base model, and `score sft` runs, each a
# change of the [sft] section, sampling from the base model on the RL runs' problems.
SFT_BASELINES = {
    "star": ("STaR D_StaR", {"kind": "star", "include_correct": False}),
    "star_plus": ("STaR D⁺_StaR", {"kind": "star", "include_correct": True}),
    "pair_sft": ("Pair-SFT D_SFT", {"kind": "pair_sft", "include_correct": False}),
    "pair_sft_plus": ("Pair-SFT D⁺_SFT", {"kind": "pair_sft", "include_correct": True}),
}


DEMO_SFT = {"max_problems": 1024, "epochs": 2, "batch_size": 32, "micro_batch_size": 32}


# A short critique request: the tiny model's 256 positions hold the prompt, attempt 1, this turn, the
# critique, the (long) correction instruction and attempt 2.
DEMO_SELF_REFINE = {"critique_instruction": "Check the solution above for errors.", "max_tokens_critique": 24}


LABELS = {
    "base": "Base model",
    "self_refine": "Self-Refine",
    **{name: label for name, (label, _) in SFT_BASELINES.items()},
    **{name: label for name, (label, _) in METHODS.items()},
}


RESULT_KEYS = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed_frac", "edit_ratio", "n")


@dataclass(frozen=True)
class DemoSizes:
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    vocab: int = 512
    warmup_steps: int = 800
    warmup_batch: int = 64
    warmup_lr: float = 1e-3
    rl_train_problems: int = 4000
    eval_problems: int = 256
    seeds: int = 3


FULL = DemoSizes()


QUICK = DemoSizes(
    hidden=32,
    layers=1,
    heads=2,
    vocab=300,
    warmup_steps=8,
    warmup_batch=8,
    rl_train_problems=64,
    eval_problems=12,
    seeds=2,
)


def demo_config(
    base_dir: Path,
    train_file: Path,
    eval_file: Path,
    seed: int,
    quick: bool,
    sft: dict | None = None,
    prompts_per_step: int = DEMO_RL["optim"]["prompts_per_step"],
    **score,
) -> RunConfig:
    """The config of one demo run; `score` changes the [score] section (a method of METHODS), `sft`
    the [sft] section (a baseline of SFT_BASELINES), `prompts_per_step` the step's problems (the
    setting's, in one micro-batch). A method without Stage I (`stage1_steps=0`) gets its steps in
    Stage II: every method has one budget."""
    raw = json.loads(json.dumps(DEMO_RL))
    raw["optim"].update(prompts_per_step=prompts_per_step, prompts_per_micro_batch=prompts_per_step)
    raw["model"]["path"] = str(base_dir)
    raw["data"].update(train=str(train_file), eval=str(eval_file))
    raw["run"]["seed"] = seed
    raw["sft"] = {**DEMO_SFT, **(sft or {})}
    raw["self_refine"] = dict(DEMO_SELF_REFINE)
    if quick:
        raw["score"].update(stage1_steps=1, stage2_steps=1)
        raw["optim"].update(prompts_per_step=2, prompts_per_micro_batch=1)
        raw["rollout"].update(samples_per_prompt=2)
        raw["sft"].update(max_problems=8, epochs=1, iterations=1)
    total = raw["score"]["stage1_steps"] + raw["score"]["stage2_steps"]
    raw["score"].update(score)
    if raw["score"]["stage1_steps"] == 0:
        raw["score"]["stage2_steps"] = total
    return config_from_dict(raw, source="score demo")
