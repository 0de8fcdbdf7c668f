"""Checks that run before a run's first step, so that a bad input stops it at once with one line
naming the file, line, key or problem, never hours later or on every resume.

- the output folder can be written (read-only file systems, a regular file in the way);
- the model folder: config.json (required keys, types: model/config.py), readable safetensors, a
  parseable tokenizer.json with its special tokens declared (tokenizer_config.json or
  special_tokens_map.json), a tokenizer no larger than the model's vocabulary, finite weights;
- the token budgets against the model's positions, and every problem's prompt with its attempts
  against them: all offending problems are named at once (`data.skip_too_long` trains without them,
  counted in the log).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from score.model import ModelConfig, load_tokenizer

from .config import RunConfig


def check_out_dir(out: str | Path, what: str = "--out") -> Path:
    """Create `out` and write a probe file in it; any OS error becomes one line naming the folder."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".score-write-probe-{os.getpid()}"  # one per process: ranks check at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what} {out}: cannot write there ({e.strerror or e})") from None
    return out


def check_model_folder(path: str | Path):
    """(ModelConfig, tokenizer) of an HF model folder, after every check that needs no weights."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model folder {path}: not a folder")
    config = ModelConfig.from_hf(path)
    tokenizer = load_tokenizer(path)
    if not any((path / name).is_file() for name in ("tokenizer_config.json", "special_tokens_map.json")):
        raise ValueError(
            f"{path}: no tokenizer_config.json or special_tokens_map.json, so its BOS/EOS/PAD tokens are unknown "
            "(prompts would silently lose their BOS); save the tokenizer with its config"
        )
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{config.vocab_size}: ids past it have no embedding"
        )
    return config, tokenizer


def check_finite(model: torch.nn.Module, where: str | Path) -> None:
    """A model with NaN or Inf weights is an error (it would train nothing and evaluate as 0 %)."""
    for name, p in model.named_parameters():
        local = getattr(p, "_local_tensor", p)  # an FSDP2 shard checks its own part
        if not bool(torch.isfinite(local).all()):
            raise ValueError(f"{where}: weight {name} holds NaN or Inf values")


def check_budgets(cfg: RunConfig, config: ModelConfig) -> None:
    """The attempts' token budgets must leave room for a prompt within max_position_embeddings."""
    r, positions = cfg.rollout, config.max_position_embeddings
    used = r.max_tokens_attempt1 + r.max_tokens_attempt2 * (cfg.score.attempts - 1)
    if used >= positions:
        raise ValueError(
            f"rollout.max_tokens_attempt1 = {r.max_tokens_attempt1} plus {cfg.score.attempts - 1} x "
            f"rollout.max_tokens_attempt2 = {r.max_tokens_attempt2} leave no room for a prompt in the model's "
            f"max_position_embeddings = {positions}"
        )


def problems_that_fit(problems, builder, cfg: RunConfig, max_model_len: int, what: str, *, skip: bool):
    """(problems whose prompt, attempts and instructions fit `max_model_len`, ids skipped, the engine
    length the longest kept one needs). Without `skip` any problem that does not fit is an error
    naming every one (id and where it was read)."""
    r, attempts = cfg.rollout, cfg.score.attempts
    extra = r.max_tokens_attempt1 + (attempts - 1) * (r.max_tokens_attempt2 + len(builder.instruction_ids))
    kept, too_long = [], []
    for p in problems:
        length = len(builder.first_attempt_ids(p.question))
        (too_long if length + extra >= max_model_len else kept).append((p, length))
    if too_long and not skip:
        named = "; ".join(f"{p.id} ({p.where or 'no file'}, prompt {n} tokens)" for p, n in too_long[:10])
        more = f"; and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        raise ValueError(
            f"{what}: {len(too_long)} of {len(problems)} problems cannot hold their prompt plus {attempts} attempts "
            f"({extra} tokens) within max_model_len = {max_model_len}: {named}{more}. Shorten them, lower the "
            "rollout budgets, or set data.skip_too_long = true to leave them out"
        )
    if not kept:
        raise ValueError(f"{what}: none of {len(problems)} problems fits max_model_len = {max_model_len}")
    return [p for p, _ in kept], [p.id for p, _ in too_long], max(n for _, n in kept) + extra + 1


def check_eval_problems(cfg: RunConfig, builder, max_model_len: int) -> int:
    """data.eval, read and checked at the start of the run with the evaluation's budgets (not after
    it); the engine length its longest problem needs."""
    from .factories import load_problems

    a1, a2 = cfg.eval_budgets
    at_eval = dataclasses.replace(
        cfg, rollout=dataclasses.replace(cfg.rollout, max_tokens_attempt1=a1, max_tokens_attempt2=a2)
    )
    problems = load_problems(cfg, cfg.data.eval)
    return problems_that_fit(problems, builder, at_eval, max_model_len, f"data.eval {cfg.data.eval}", skip=False)[2]


def check_wandb(cfg: RunConfig) -> None:
    """run.wandb = true needs the wandb package; say so before any work."""
    if cfg.run.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("run.wandb = true needs the wandb package: pip install 'score-rl[wandb]'") from None
