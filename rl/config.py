"""Run configuration: typed dataclasses read from one TOML file per run.

A run file has the sections `[model] [data] [prompt] [reward] [rollout] [score] [optim] [sft]
[self_refine] [run]` (`[sft]` is read by `score sft`, `[self_refine]` by `score eval --self-refine`); every
field below carries its default and a one-line help (`describe_config()` prints them all, and
`configs/*.toml` show them in use). Unknown sections or keys, wrong types and out-of-range values are
errors that name the file, the line and the key (`ConfigError`). `--set section.key=value` overrides
are parsed as TOML values (a bare word that is not valid TOML is taken as a string).

Not done here: loading the model or data the fields point to (the trainer does that and reports its
own errors).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A bad run configuration; the message names the file, line and key."""


def _f(default, help: str, *, check=None, factory=None):
    meta = {"help": help, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_pos = (lambda v: v > 0, "> 0")
_nonneg = (lambda v: v >= 0, ">= 0")
_prob = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


@dataclass
class ModelSection:
    path: str = _f(
        "",
        "HF-format model folder (config.json, safetensors, tokenizer files), or a Hub id ORG/NAME[@REVISION] "
        "resolved through the huggingface_hub cache (HF_HOME, HF_HUB_OFFLINE); required",
    )
    master_dtype: Literal["float32", "bfloat16"] = _f(
        "float32",
        "dtype of the trained (master) weights and of AdamW's state. bfloat16 halves their memory but loses "
        "learning: an update smaller than half a bf16 ulp of its weight (2**-9 relative, e.g. most AdamW "
        "steps at lr 1e-5) rounds away and the weight does not move. One process only",
    )
    autocast: Literal["auto", "bf16", "off"] = _f(
        "auto",
        "compute dtype of every forward pass: bf16 = bf16 autocast over the fp32 masters (the frozen reference "
        "and the engine's weights and KV cache held in bf16); off = compute in master_dtype; auto = bf16 on "
        "CUDA, off on CPU",
    )
    kernels: Literal["auto", "triton", "torch"] = _f(
        "auto",
        "norms, SwiGLU, RoPE and attention: triton = our Triton kernels (on CPU only under TRITON_INTERPRET=1); "
        "torch = the plain torch ops; auto = Triton on CUDA, torch on CPU",
    )
    final_dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto",
        "dtype of the exported final/ weights; auto = the dtype model.path stores its weights in (checkpoints "
        "always keep the master weights)",
    )
    activation_checkpointing: bool = _f(False, "recompute each layer's activations in backward to save memory")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "where to train: auto = cuda when available")
    reference_cpu_offload: bool = _f(
        False,
        "multi-GPU runs: keep the frozen reference's shards in host memory (saves 2 bytes x params / GPUs "
        "per GPU, costs a host-to-device copy per forward)",
    )


@dataclass
class DataSection:
    train: str = _f(
        "",
        "training problems: JSONL, a Parquet file or folder, hf:NAME[:CONFIG][@SPLIT] (datasets: a Hub name "
        "or a save_to_disk folder), or builtin:arithmetic/train; required",
    )
    eval: str = _f("", "held-out problems for the end-of-run evaluation, same forms as data.train ('' = none)")
    question_key: str = _f("problem", "JSONL field holding the question")
    answer_key: str = _f("", "JSONL field holding the reference answer ('' = last \\boxed{} of solution_key)")
    solution_key: str = _f("solution", "JSONL field holding a worked solution (used when answer_key is '')")
    id_key: str = _f("", "JSONL field holding a problem id ('' = file:line)")
    shuffle: bool = _f(True, "reshuffle the training problems every epoch (seeded by run.seed and epoch)")
    skip_too_long: bool = _f(
        False,
        "leave out training problems whose prompt plus attempts cannot fit the model's positions (counted "
        "in skipped_problems.json); false = such problems are an error naming each one",
    )


@dataclass
class PromptSection:
    chat: bool = _f(True, "render prompts with the tokenizer's chat template (instruct models); false = plain text")
    system_prompt: str = _f("default", "system prompt; 'default' = the paper's prompt for reward.kind, '' = none")
    correction_instruction: str = _f(
        "default", "instruction between the attempts; 'default' = the paper's instruction for reward.kind"
    )


@dataclass
class RewardSection:
    kind: Literal["math", "exact", "integer", "code"] = _f(
        "math",
        "math: final answer equal by math-verify; exact: final answer equal as a string; "
        "integer: the reply's integer answer (final answer, else last number) equal; "
        "code: all unit tests pass in the sandbox",
    )
    timeout_s: float = _f(5.0, "per-answer grading / per-program execution timeout in seconds", check=_pos)
    workers: int = _f(1, "grading worker processes (math) or sandboxes run in parallel (code)", check=_pos)
    memory_mb: int = _f(1024, "address-space limit of one sandboxed program (code)", check=_pos)


@dataclass
class RolloutSection:
    samples_per_prompt: int = _f(4, "k trajectories per prompt (RLOO needs k >= 2)", check=(lambda v: v >= 2, ">= 2"))
    temperature: float = _f(1.0, "sampling temperature of training rollouts (the paper's 1.0)", check=_pos)
    top_p: float = _f(1.0, "nucleus sampling mass (1.0 = off)", check=(lambda v: 0 < v <= 1, "in (0, 1]"))
    top_k: int = _f(0, "top-k sampling (0 = off)", check=_nonneg)
    max_tokens_attempt1: int = _f(512, "token budget of attempt 1", check=_pos)
    max_tokens_attempt2: int = _f(512, "token budget of attempt 2", check=_pos)
    block_size: int = _f(16, "KV-cache block size of the engine", check=_pos)
    max_num_seqs: int = _f(256, "sequences the engine decodes at once", check=_pos)
    num_blocks: int = _f(0, "KV-cache blocks (0 = sized by the engine)", check=_nonneg)


@dataclass
class ScoreSection:
    stage1_steps: int = _f(100, "optimizer steps of Stage I (attempt 1 anchored to the base model)", check=_nonneg)
    stage2_steps: int = _f(200, "optimizer steps of Stage II (both attempts, progress bonus)", check=_nonneg)
    alpha: float = _f(10.0, "progress bonus weight in Stage II: r2 + alpha*(r2 - r1)", check=_nonneg)
    beta1: float = _f(0.01, "KL weight against the reference, every attempt not anchored", check=_nonneg)
    beta2: float = _f(0.1, "Stage I KL weight on attempt 1 (0.1 MATH, 0.25 code in the paper)", check=_nonneg)
    kl_kind: Literal["k1", "k2", "k3", "k3+"] = _f("k1", "per-token KL estimator")
    kl_placement: Literal["kl_in_reward", "kl_loss"] = _f(
        "kl_in_reward", "kl_in_reward: sequence KL subtracted from the returns (paper); kl_loss: per-token loss term"
    )
    baseline: Literal["rloo", "none"] = _f("rloo", "leave-one-out baseline over the k samples of a prompt")
    normalization: Literal["token_mean", "sequence_mean"] = _f(
        "token_mean", "loss normaliser: all active tokens of the step's batch, or its trajectories"
    )
    base_first_attempt_mix: float = _f(
        0.0,
        "Stage II: fraction of prompts whose attempt 1 comes from the frozen base model (paper's option)",
        check=_prob,
    )
    online_first_attempt: bool = _f(
        True,
        "false: every attempt 1, in both stages, is sampled by the frozen base model and never trained "
        "(the paper's 'without online turn-1 samples' ablation)",
    )
    single_turn: bool = _f(
        False,
        "train attempt 1 alone with REINFORCE on r1 (no attempt 2 is sampled during training): the "
        "paper's single-turn RL ablation; needs stage1_steps = 0",
    )
    attempts: int = _f(
        2,
        "attempts per trajectory; N > 2 splits Stage I into N - 1 parts of stage1_steps each (part j trains "
        "attempt j + 1 with attempts 1..j anchored to the model of part j - 1, the base model for j = 1), "
        "then Stage II rewards progress alpha (r_i - r_{i-1}) on every attempt after the first",
        check=(lambda v: v >= 2, ">= 2"),
    )
    stage2_update: Literal["reinforce", "star"] = _f(
        "reinforce",
        "Stage II update: reinforce = the returns above; star = supervised training on the "
        "attempts whose reward is 1 (the paper's 'STaR instead of REINFORCE' ablation)",
    )


@dataclass
class OptimSection:
    lr: float = _f(5e-6, "peak AdamW learning rate", check=_pos)
    weight_decay: float = _f(0.0, "AdamW weight decay", check=_nonneg)
    beta1: float = _f(0.9, "AdamW beta1", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    beta2: float = _f(0.999, "AdamW beta2", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    eps: float = _f(1e-8, "AdamW epsilon", check=_pos)
    warmup_steps: int = _f(10, "linear warm-up steps from 0 to lr", check=_nonneg)
    schedule: Literal["constant", "cosine"] = _f("constant", "after warm-up: constant lr, or cosine decay")
    min_lr_ratio: float = _f(0.1, "cosine floor as a fraction of lr", check=_prob)
    grad_clip: float = _f(1.0, "global gradient-norm clip (0 = off)", check=_nonneg)
    prompts_per_step: int = _f(32, "prompts per optimizer step (each gives k trajectories)", check=_pos)
    prompts_per_micro_batch: int = _f(
        8, "prompts per forward/backward (gradient accumulation; a prompt's group is never split)", check=_pos
    )
    tokens_per_micro_batch: int = _f(
        0,
        "when > 0: micro-batches of about this many packed tokens, whole prompt groups balanced across "
        "micro-batches and ranks, instead of prompts_per_micro_batch (same gradient, fewer idle tokens)",
        check=_nonneg,
    )


@dataclass
class SftSection:
    kind: Literal["star", "pair_sft"] = _f(
        "star",
        "`score sft` baseline: star = keep the model's own wrong-then-right two-attempt traces; pair_sft = "
        "pair a wrong and a right first attempt of the same problem, both sampled from the base model",
    )
    include_correct: bool = _f(
        False, "also train on correct-then-correct traces (the paper's D+ datasets: STaR+ and Pair-SFT+)"
    )
    iterations: int = _f(
        0,
        "rounds of sample -> filter -> train, each sampling from the previous round's model and training from "
        "the base model (0 = the paper's: 3 for star, 1 for pair_sft)",
        check=_nonneg,
    )
    max_problems: int = _f(0, "training problems sampled per round (0 = all of data.train)", check=_nonneg)
    epochs: int = _f(2, "passes over each round's traces", check=_pos)
    batch_size: int = _f(32, "traces per optimizer step", check=_pos)
    micro_batch_size: int = _f(8, "traces per forward/backward (gradient accumulation)", check=_pos)

    @property
    def rounds(self) -> int:
        return self.iterations or (3 if self.kind == "star" else 1)


@dataclass
class SelfRefineSection:
    critique_instruction: str = _f(
        "default", "Self-Refine: the user turn after attempt 1 asking for a critique ('default' = a built-in one)"
    )
    refine_instruction: str = _f(
        "default",
        "Self-Refine: the user turn after the critique asking for the rewrite ('default' = the run's "
        "correction instruction)",
    )
    max_tokens_critique: int = _f(256, "token budget of the critique", check=_pos)


@dataclass
class RunSection:
    seed: int = _f(
        0,
        "seed of data order, sampling and init; sampling is keyed on (step, prompt, sample)",
        check=(lambda v: 0 <= v < 2**31, "in [0, 2**31)"),
    )
    checkpoint_every: int = _f(50, "save a checkpoint every N optimizer steps (0 = only at the end)", check=_nonneg)
    keep_last: int = _f(3, "checkpoints kept on disk", check=_pos)
    eval_max_problems: int = _f(0, "cap on end-of-run evaluation problems (0 = all)", check=_nonneg)
    eval_max_tokens: int = _f(
        0,
        "token budget of each greedy evaluation attempt (0 = the rollout budgets max_tokens_attempt1/2)",
        check=_nonneg,
    )
    tensorboard: bool = _f(False, "also write TensorBoard events (needs the tensorboard package)")
    wandb: bool = _f(False, "also log metrics, config and the eval table to Weights & Biases (the wandb extra)")
    wandb_project: str = _f("score-rl", "Weights & Biases project")
    wandb_name: str = _f("", "Weights & Biases run name ('' = the run folder's name)")
    plots: bool = _f(True, "write PNG plots of the run's metrics at the end")
    progress: bool = _f(True, "tqdm progress bars")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    reward: RewardSection = field(default_factory=RewardSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    score: ScoreSection = field(default_factory=ScoreSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sft: SftSection = field(default_factory=SftSection)
    self_refine: SelfRefineSection = field(default_factory=SelfRefineSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def eval_budgets(self) -> tuple[int, int]:
        """Token budgets of the greedy evaluation's attempts 1 and 2."""
        if self.run.eval_max_tokens:
            return self.run.eval_max_tokens, self.run.eval_max_tokens
        return self.rollout.max_tokens_attempt1, self.rollout.max_tokens_attempt2

    @property
    def total_steps(self) -> int:
        return self.score.stage1_steps * (self.score.attempts - 1) + self.score.stage2_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
_SECTION_TYPES = {name: globals()[t] if isinstance(t, str) else t for name, t in SECTIONS.items()}


def describe_config() -> str:
    """Every section and field with its type, default and help (what `score train --describe` prints)."""
    lines = []
    for name, cls in _SECTION_TYPES.items():
        lines.append(f"[{name}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name} = {f.default!r}  # {_type_name(hints[f.name])}: {f.metadata['help']}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run TOML, apply `section.key=value` overrides, validate; errors name file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    overridden = {_apply_override(raw, item, path): item for item in overrides}
    return config_from_dict(raw, source=str(path), text=text, overridden=overridden)


def config_with_overrides(raw: dict, overrides, *, source: str) -> RunConfig:
    """`config_from_dict` after applying `section.key=value` overrides to `raw`."""
    overridden = {_apply_override(raw, item, Path(source)): item for item in overrides}
    return config_from_dict(raw, source=source, overridden=overridden)


def config_from_dict(raw: dict, *, source: str = "<dict>", text: str = "", overridden: dict | None = None) -> RunConfig:
    """Build a validated RunConfig from nested dicts ({section: {key: value}}); `overridden` maps the
    (section, key) pairs set by `--set` to their item, which errors name instead of the file's line."""
    overridden = overridden or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(raw).__name__}")
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(
                f"{_where(source, text, None, name, overridden)}: unknown section [{name}]; "
                f"known sections: {', '.join(_SECTION_TYPES)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"{_where(source, text, None, name, overridden)}: [{name}] must be a table of keys, "
                f"got {type(value).__name__}"
            )
        sections[name] = _build_section(name, value, source, text, overridden)
    for name, cls in _SECTION_TYPES.items():
        sections.setdefault(name, cls())
    _check_training_variant(sections["score"], source, text, overridden)
    return RunConfig(**sections)


def _check_training_variant(s: ScoreSection, source: str, text: str, overridden: dict) -> None:
    """Combinations of score keys that describe no training run."""
    if s.attempts > 2 and s.single_turn:
        raise ConfigError(
            f"{_where(source, text, 'score', 'attempts', overridden)}: score.attempts = {s.attempts} with "
            "score.single_turn = true: single-turn RL samples one attempt (set score.attempts = 2)"
        )
    if not s.single_turn:
        return
    where = _where(source, text, "score", "single_turn", overridden)
    if s.stage1_steps:
        raise ConfigError(
            f"{where}: score.single_turn = true trains attempt 1 only, which has no Stage I; "
            f"set score.stage1_steps = 0 (got {s.stage1_steps}) and put the budget in stage2_steps"
        )
    if not s.online_first_attempt:
        raise ConfigError(f"{where}: score.single_turn = true with score.online_first_attempt = false trains nothing")
    if s.stage2_update != "reinforce":
        raise ConfigError(f"{where}: score.single_turn = true needs score.stage2_update = 'reinforce'")


# Keys of earlier versions whose meaning changed: an error that says what replaced them, never a
# silent reinterpretation.
RETIRED_KEYS = {
    ("model", "autocast_bf16"): "use model.autocast = 'auto' (bf16 on CUDA), 'bf16' or 'off'",
    ("model", "dtype"): (
        "master weights are model.master_dtype (float32 by default: bf16 masters lose small AdamW updates) and "
        "the forward passes compute in bf16 on GPU through model.autocast"
    ),
}


def _build_section(name: str, values: dict, source: str, text: str, overridden: dict):
    cls = _SECTION_TYPES[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = _where(source, text, name, key, overridden)
        if (name, key) in RETIRED_KEYS:
            raise ConfigError(f"{where}: {name}.{key} is no longer a key: {RETIRED_KEYS[name, key]}")
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {name}.{key}; known keys of [{name}]: {', '.join(fields)}")
        kwargs[key] = _check_value(f"{name}.{key}", value, hints[key], fields[key].metadata.get("check"), where)
    return cls(**kwargs)


def _check_value(key: str, value, hint, check, where: str):
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {key} must be one of {list(choices)}, got {value!r}")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    else:  # pragma: no cover - every field above has one of these types
        raise TypeError(f"unsupported config type {hint} for {key}")
    if check is not None and not check[0](value):
        raise ConfigError(f"{where}: {key} must be {check[1]}, got {value!r}")
    return value


def _apply_override(raw: dict, item: str, path: Path) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, value_text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be section.key (e.g. optim.lr), got {dotted!r}")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()  # a bare word: a string
    section, key = parts
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"--set {item!r}: [{section}] in {path} is not a table")
    table[key] = value
    return section, key


def _where(source: str, text: str, section: str | None, key: str, overridden: dict) -> str:
    """`--set ITEM` for a key set on the command line, else `file:line` of a key (or a section header
    when `section` is None), or just the file."""
    if section is not None and (section, key) in overridden:
        return f"--set {overridden[section, key]}"
    if section is None and _line_of(text, None, key) is None:
        made = [item for (s, _), item in overridden.items() if s == key]
        if made:
            return f"--set {made[0]}"
    line = _line_of(text, section, key) if text else None
    return f"{source}:{line}" if line else f"{source} (--set or default)" if text else source


def _line_of(text: str, section: str | None, key: str) -> int | None:
    current = None
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
    assign = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")
    for i, line in enumerate(text.splitlines(), start=1):
        m = header.match(line)
        if m:
            current = m.group(1)
            if section is None and current == key:
                return i
            continue
        m = assign.match(line)
        if m and section is not None and current == section and m.group(1).strip('"') == key:
            return i
    return None


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "|".join(repr(c) for c in typing.get_args(hint))
    return hint.__name__


def to_toml(cfg: RunConfig) -> str:
    """`cfg` as a TOML file that `load_config` reads back to the same RunConfig."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        lines.append("")
    return "\n".join(lines)
