"""Checks that run before a run's first step, so that a bad input stops it at once with one line
naming the file, line, key or problem, never hours later or on every resume.

- the output folder can be written (read-only file systems, a regular file in the way);
- the model folder: config.json (required keys, types: model/config.py), readable safetensors, a
  parseable tokenizer.json with its special tokens declared (tokenizer_config.json or
  special_tokens_map.json), a tokenizer no larger than the model's vocabulary, finite weights;
- the token budgets against the model's positions, and every problem's prompt with its attempts
  against them: all offending problems are named at once (`data.skip_too_long` trains without them,
  counted in the log); evaluation problems against the evaluation's budgets, naming the key behind
  each part (`run.eval_max_tokens`, the Self-Refine turns), in every mode of `score eval`;
- `run.wandb`: the package, and a login or offline mode.
"""

from __future__ import annotations

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

    problems = load_problems(cfg, cfg.data.eval)
    return check_eval_room(
        cfg, builder, problems, max_model_len, f"data.eval {cfg.data.eval}", attempts=cfg.score.attempts
    )


def eval_budget_keys(cfg: RunConfig) -> tuple[str, str]:
    """The config keys that set the evaluation's budgets of attempt 1 and of the later attempts."""
    if cfg.run.eval_max_tokens:
        return "run.eval_max_tokens", "run.eval_max_tokens"
    return "rollout.max_tokens_attempt1", "rollout.max_tokens_attempt2"


def check_eval_room(
    cfg: RunConfig,
    builder,
    problems,
    max_model_len: int,
    what: str,
    *,
    attempts: int = 2,
    turns: tuple | None = None,
    given: dict | None = None,
) -> int:
    """Every evaluation problem must hold its prompt and each later turn at its full budget within
    `max_model_len` (no attempt is cut short by the context): greedy attempts (`attempts`), Self-Refine
    (`turns` = its critique and refine builders) or corrections of given first attempts (`given`: id ->
    attempt-1 token count). The error names each offending problem (id, file and line) and the key
    behind each part of the budget. Returns the engine length the longest problem needs."""
    (a1, a2), (k1, k2) = cfg.eval_budgets, eval_budget_keys(cfg)
    instruction = len(builder.instruction_ids)
    if turns is not None:
        critique, refine = (len(t.instruction_ids) for t in turns)
        critique_budget = cfg.self_refine.max_tokens_critique
        parts = [
            (f"attempt 1 ({k1} = {a1})", a1),
            (f"the critique request (self_refine.critique_instruction, {critique} tokens)", critique),
            (f"the critique (self_refine.max_tokens_critique = {critique_budget})", critique_budget),
            (f"the refine turn (self_refine.refine_instruction, {refine} tokens)", refine),
            (f"attempt 2 ({k2} = {a2})", a2),
        ]
    else:
        later = f"{attempts - 1} x " if attempts > 2 else ""
        parts = [
            ("the given attempt 1", 0) if given is not None else (f"attempt 1 ({k1} = {a1})", a1),
            (
                f"{later}the correction instruction (prompt.correction_instruction, {instruction} tokens)",
                (attempts - 1) * instruction,
            ),
            (f"{later}attempt 2 ({k2} = {a2})", (attempts - 1) * a2),
        ]
    extra = sum(n for _, n in parts)
    spelled = " + ".join(name for name, _ in parts)
    if extra >= max_model_len:
        raise ValueError(
            f"{what}: {spelled} = {extra} tokens leave no room for a prompt within max_model_len = {max_model_len} "
            "(the model's max_position_embeddings); lower the ones named"
        )
    too_long, longest = [], 0
    for p in problems:
        length = len(builder.first_attempt_ids(p.question)) + (given.get(p.id, 0) if given is not None else 0)
        longest = max(longest, length + extra + 1)
        if length + extra >= max_model_len:
            too_long.append((p, length))
    if too_long:
        named = "; ".join(f"{p.id} ({p.where or 'no file'}, {n} tokens)" for p, n in too_long[:10])
        more = f"; and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        counted = "prompt and given attempt 1" if given is not None else "prompt"
        raise ValueError(
            f"{what}: {len(too_long)} of {len(problems)} problems cannot hold their {counted} plus {spelled} "
            f"= {extra} tokens within max_model_len = {max_model_len}: {named}{more}. Shorten them or lower "
            "the budgets named"
        )
    return longest


def check_wandb(cfg: RunConfig) -> None:
    """run.wandb = true needs the wandb package and a way to log in (or offline mode); both are
    checked before any folder is written, where wandb itself would fail after the run started."""
    if not cfg.run.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError("run.wandb = true needs the wandb package: pip install 'score-rl[wandb]'") from None
    if not wandb_can_log():
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        raise ValueError(
            f"run.wandb = true: no W&B login for {host} (no WANDB_API_KEY, no ~/.netrc entry from `wandb login`); "
            "log in, or set WANDB_MODE=offline to log into the run folder and `wandb sync` it later"
        )


def wandb_can_log() -> bool:
    """Whether wandb.init would find credentials, or need none: offline or disabled mode (environment
    or `wandb offline`'s settings file), an API key or identity token in the environment, or a
    .netrc entry for the W&B host."""
    import configparser
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    for settings in (config_dir / "settings", Path("wandb") / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(settings, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.get("default", "mode", fallback="").lower() in ("offline", "dryrun", "disabled"):
            return True
        if parser.get("default", "api_key", fallback=""):
            return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])
