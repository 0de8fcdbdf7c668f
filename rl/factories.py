"""The parts of a run built from its config, shared by `score train`, `score eval` and `score demo`:
device, prompt builder, problems, engine and reward."""

from __future__ import annotations

import dataclasses

import torch

from score.model import Engine
from score.model.hub import resolve_model_path

from . import arithmetic_task
from .config import RunConfig
from .data import Problem, is_parquet_source, load_hf_dataset, load_jsonl, load_parquet, parse_hf_source
from .precision import Precision
from .prompts import (
    CODE_CORRECTION_INSTRUCTION,
    CRITIQUE_INSTRUCTION,
    INTEGER_CORRECTION_INSTRUCTION,
    INTEGER_SYSTEM_PROMPT,
    MATH_CORRECTION_INSTRUCTION,
    MATH_SYSTEM_PROMPT,
    PromptBuilder,
)
from .rewards import BatchReward


def with_local_model(cfg: RunConfig) -> RunConfig:
    """The config with model.path a local folder: itself, or the Hub snapshot of an id (model/hub.py)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=resolve_model_path(cfg.model.path)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device = 'cuda' but CUDA is not available")
    return torch.device(name)


# reward.kind -> (system prompt, correction instruction) that 'default' stands for.
DEFAULT_PROMPTS = {
    "math": (MATH_SYSTEM_PROMPT, MATH_CORRECTION_INSTRUCTION),
    "exact": (MATH_SYSTEM_PROMPT, MATH_CORRECTION_INSTRUCTION),
    "integer": (INTEGER_SYSTEM_PROMPT, INTEGER_CORRECTION_INSTRUCTION),
    "code": (None, CODE_CORRECTION_INSTRUCTION),
}


def prompt_builder(cfg: RunConfig, tokenizer) -> PromptBuilder:
    """The PromptBuilder of a run: 'default' = the paper's text for the reward kind, '' = none."""
    p = cfg.prompt
    system, instruction = p.system_prompt, p.correction_instruction
    if system == "default":
        system = DEFAULT_PROMPTS[cfg.reward.kind][0]
    if instruction == "default":
        instruction = DEFAULT_PROMPTS[cfg.reward.kind][1]
    if not instruction:
        raise ValueError("prompt.correction_instruction must not be empty (attempt 2 needs an instruction)")
    return PromptBuilder(tokenizer, chat=p.chat, system_prompt=system or None, correction_instruction=instruction)


def self_refine_builders(cfg: RunConfig, builder: PromptBuilder) -> tuple[PromptBuilder, PromptBuilder]:
    """Self-Refine's (critique, refine) turns around `builder`'s prompts; 'default' = the built-in
    critique request and the run's own correction instruction."""
    sr = cfg.self_refine
    critique = CRITIQUE_INSTRUCTION if sr.critique_instruction == "default" else sr.critique_instruction
    refine = builder.correction_instruction if sr.refine_instruction == "default" else sr.refine_instruction
    for key, text in (("critique_instruction", critique), ("refine_instruction", refine)):
        if not text.strip():
            raise ValueError(f"self_refine.{key} must not be empty")
    return builder.with_instruction(critique), builder.with_instruction(refine)


def load_problems(cfg: RunConfig, path: str) -> list[Problem]:
    """Problems of a data source for the run's reward kind: JSONL, a Parquet file or folder,
    `hf:NAME[:CONFIG][@SPLIT]` through `datasets` (a Hub name or a dataset saved to disk), code
    (MBPP JSONL or 'humaneval'), or a built-in task (`builtin:arithmetic/train`, `.../eval`)."""
    if arithmetic_task.is_source(path):
        return arithmetic_task.load_source(path)
    if path.startswith("builtin:"):
        raise ValueError(f"unknown data source {path!r}; built-in: {arithmetic_task.SOURCE_PREFIX}{{train,eval}}")
    if cfg.reward.kind == "code":
        from .rewards.code_problems import load_humaneval, load_mbpp_jsonl

        raw = load_humaneval() if path == "humaneval" else load_mbpp_jsonl(path)
        out = []
        for p in raw:
            question = p["prompt"] if "entry_point" in p else p["text"] + "\n" + "\n".join(p["test_list"][:1])
            out.append(Problem(id=str(p["task_id"]), question=question, answer="", meta={"code": p}))
        return out
    d = cfg.data
    keys = dict(
        question_key=d.question_key,
        answer_key=d.answer_key or None,
        solution_key=d.solution_key,
        id_key=d.id_key or None,
    )
    if path.startswith("hf:"):
        name, config, split = parse_hf_source(path)
        return load_hf_dataset(name, config=config, split=split, **keys)
    if is_parquet_source(path):
        return load_parquet(path, **keys)
    return load_jsonl(
        path,
        question_key=d.question_key,
        answer_key=d.answer_key or None,
        solution_key=d.solution_key,
        id_key=d.id_key or None,
    )


def make_engine(cfg: RunConfig, model, *, max_model_len: int | None = None) -> Engine:
    """The run's engine over `model`, generating in the run's compute dtype (a bf16 copy of fp32
    master weights on GPU: precision.py). `max_model_len`: the run's longest sequence (prompt and
    every attempt), which sizes each sequence's block table; None: the model's positions."""
    r, precision = cfg.rollout, Precision.of(cfg, model.lm_head_weight.device)
    return Engine(
        model,
        dtype=precision.compute_dtype,
        attention_backend="triton" if precision.kernels == "triton" else "auto",
        block_size=r.block_size,
        num_blocks=r.num_blocks or None,
        max_model_len=max_model_len,
        max_num_seqs=r.max_num_seqs,
    )


def make_reward(cfg: RunConfig) -> BatchReward:
    r = cfg.reward
    return BatchReward(r.kind, timeout_s=r.timeout_s, workers=r.workers, memory_mb=r.memory_mb)
