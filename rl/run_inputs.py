"""What a run reads, read and checked in one place before any model is built: the model folder's
config and tokenizer, the prompt builder, and for a training run (`score train`, `score sft`, the
demo's runs) the training problems that fit (the others refused or skipped, as data.skip_too_long
says) and the engine length the longest training or evaluation problem needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from score.model import ModelConfig, Tokenizer
from score.model.files import write_json

from .config import RunConfig
from .data import Problem
from .factories import load_problems, prompt_builder
from .preflight import check_budgets, check_eval_problems, check_model_folder, problems_that_fit
from .prompts import PromptBuilder

SKIPPED_FILE = "skipped_problems.json"


@dataclass(frozen=True)
class ModelInputs:
    """A model folder's config and tokenizer, and the prompts `cfg` builds with that tokenizer."""

    model_config: ModelConfig
    tokenizer: Tokenizer
    builder: PromptBuilder


@dataclass(frozen=True)
class RunInputs(ModelInputs):
    """A training run's inputs: its model's, the training problems that fit, the ids of those left
    out (data.skip_too_long) and the engine length the longest problem (training or data.eval) needs."""

    problems: list[Problem]
    skipped: list[str]
    max_model_len: int


def model_inputs(cfg: RunConfig, path: str | Path) -> ModelInputs:
    """The model folder at `path`, checked (config, weights' presence, tokenizer), and its prompts."""
    model_config, tokenizer = check_model_folder(path)
    return ModelInputs(model_config, tokenizer, prompt_builder(cfg, tokenizer))


def run_inputs(cfg: RunConfig, *, max_problems: int = 0) -> RunInputs:
    """Everything a training run reads, checked: cfg.model.path, the budgets against its positions,
    data.train (its first `max_problems` when set) and data.eval."""
    model = model_inputs(cfg, cfg.model.path)
    check_budgets(cfg, model.model_config)
    positions = model.model_config.max_position_embeddings
    problems = load_problems(cfg, cfg.data.train)
    if max_problems:
        problems = problems[:max_problems]
    problems, skipped, longest = problems_that_fit(
        problems, model.builder, cfg, positions, f"data.train {cfg.data.train}", skip=cfg.data.skip_too_long
    )
    if cfg.data.eval:  # read and checked now, with the evaluation's budgets, not after training
        longest = max(longest, check_eval_problems(cfg, model.builder, positions))
    return RunInputs(model.model_config, model.tokenizer, model.builder, problems, skipped, longest)


def report_skipped(out_dir: Path, skipped: list[str]) -> None:
    """Name the training problems data.skip_too_long left out, in DIR/skipped_problems.json and a line."""
    if skipped:
        write_json(out_dir / SKIPPED_FILE, {"count": len(skipped), "ids": skipped})
        print(
            f"data.skip_too_long: {len(skipped)} training problems do not fit and are left out "
            f"(ids in {out_dir / SKIPPED_FILE})",
            flush=True,
        )
