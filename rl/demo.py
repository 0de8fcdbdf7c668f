"""`score demo`: SCoRe end to end on CPU in minutes, with nothing downloaded.

1. A byte-level BPE tokenizer is trained on the demo task's texts (`tokenizers`), and a tiny
   Llama-style decoder (score.model.Transformer) is warmed up with supervised training on the
   procedural task of `demo_task.py` (sums of four numbers from 10 to 29): direct first attempts and
   two-attempt traces whose second attempts are careless (module docstring there).
2. That base model is saved in HF format (`DIR/base`: safetensors, config.json, tokenizer files).
3. It is evaluated greedily on held-out problems (two attempts): `DIR/eval_base.jsonl`.
4. Stage I and Stage II run through `rl.trainer.Trainer`, the same code path as `score train`
   (the run's config is written to `DIR/score/config.toml`, its metrics to `DIR/score/metrics.jsonl`).
5. The trained model is evaluated the same way (`DIR/eval_score.jsonl`); the table is printed and
   `DIR/results.json` written; plots of the SCoRe run's metrics go to `DIR/plots`.
`--ablations` adds "no Stage I" (Stage II only, same number of steps) and "no reward shaping"
(alpha = 0). `--quick` shrinks everything to check the pipeline in seconds (not the result).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from score.kernels import fused_linear_logprob
from score.model import Engine, ModelConfig, Tokenizer, Transformer, save_pretrained

from . import demo_task
from .config import RunConfig, config_from_dict
from .evaluate import evaluate, table, write_json, write_records
from .prompts import PromptBuilder
from .rewards import BatchReward

# The RL settings of the demo (configs/demo.toml holds the same, for `score train`).
DEMO_RL = {
    "model": {"dtype": "float32", "device": "cpu"},
    "data": {"question_key": "problem", "answer_key": "answer", "id_key": "id"},
    "prompt": {"chat": False, "system_prompt": "", "correction_instruction": demo_task.CORRECTION_INSTRUCTION},
    "reward": {"kind": "exact"},
    "rollout": {"samples_per_prompt": 4, "temperature": 1.0, "max_tokens_attempt1": 10, "max_tokens_attempt2": 40,
                "max_num_seqs": 256},
    "score": {"stage1_steps": 40, "stage2_steps": 80, "alpha": 10.0, "beta1": 0.01, "beta2": 0.1},
    "optim": {"lr": 1e-4, "warmup_steps": 3, "schedule": "constant", "grad_clip": 1.0, "prompts_per_step": 16,
              "prompts_per_micro_batch": 16},
    "run": {"checkpoint_every": 0, "keep_last": 1, "eval_max_tokens": 40, "plots": False},
}


@dataclass(frozen=True)
class DemoSizes:
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    vocab: int = 400
    warmup_steps: int = 1000
    warmup_batch: int = 64
    warmup_lr: float = 3e-3
    rl_train_problems: int = 4000
    eval_problems: int = 256


FULL = DemoSizes()
QUICK = DemoSizes(hidden=32, layers=1, heads=2, vocab=300, warmup_steps=8, warmup_batch=8, rl_train_problems=64,
                  eval_problems=12)


# ---------------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """Byte-level BPE trained on the demo's texts; digits are always single tokens."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(demo_task.tokenizer_corpus(2000, seed), trainer)
    return Tokenizer(backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def build_model(tokenizer: Tokenizer, sizes: DemoSizes) -> Transformer:
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=sizes.hidden, intermediate_size=3 * sizes.hidden,
                      num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Transformer(cfg)


def encode_warmup(example: demo_task.WarmupExample, builder: PromptBuilder, eos: int) -> tuple[list[int], list[int]]:
    """Token ids of one warm-up sequence (token-in-token-out, like rollouts) and its loss mask."""
    prompt = builder.first_attempt_ids(example.question)
    ids, mask = list(prompt), [0] * len(prompt)
    first = builder.tokenizer.encode(example.attempts[0]) + [eos]
    ids += first
    mask += [int(example.trained[0])] * len(first)
    if len(example.attempts) > 1:
        context, _ = builder.second_attempt_ids(prompt, first, "stop")
        mask += [0] * (len(context) - len(ids))
        ids = context
        second = builder.tokenizer.encode(example.attempts[1]) + [eos]
        ids += second
        mask += [1] * len(second)
    return ids, mask


def warm_up(model: Transformer, builder: PromptBuilder, sizes: DemoSizes, seed: int, progress: bool) -> float:
    """Supervised warm-up on the demo task; returns the last loss. Packed sequences, no logits."""
    rng = random.Random(f"demo-warmup-{seed}")
    eos = builder.tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=sizes.warmup_lr, betas=(0.9, 0.98), weight_decay=0.0)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sizes.warmup_steps, desc="warm-up (supervised)", unit="step", dynamic_ncols=True)
    loss_value = float("nan")
    for step in range(sizes.warmup_steps):
        ids, targets, mask, cu = [], [], [], [0]
        for _ in range(sizes.warmup_batch):
            seq, m = encode_warmup(demo_task.warmup_example(rng), builder, eos)
            ids += seq
            targets += seq[1:] + [eos]  # the last row predicts nothing (masked)
            mask += m[1:] + [0]
            cu.append(len(ids))
        warm = min(1.0, (step + 1) / 50)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / sizes.warmup_steps))
        for group in opt.param_groups:
            group["lr"] = sizes.warmup_lr * warm * cosine
        hidden = model.hidden_states(torch.tensor(ids), cu_seqlens=torch.tensor(cu, dtype=torch.int32))
        weights = torch.tensor(mask, dtype=torch.float32)
        logp = fused_linear_logprob(hidden, model.lm_head_weight, torch.tensor(targets))
        loss = -(logp * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    if bar is not None:
        bar.close()
    return loss_value


def write_problems(path: Path, problems) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"id": p.id, "problem": p.question, "answer": p.answer}) + "\n")
    return path


def demo_config(base_dir: Path, train_file: Path, eval_file: Path, seed: int, quick: bool, **score) -> RunConfig:
    raw = json.loads(json.dumps(DEMO_RL))
    raw["model"]["path"] = str(base_dir)
    raw["data"].update(train=str(train_file), eval=str(eval_file))
    raw["run"]["seed"] = seed
    raw["score"].update(score)
    if quick:
        raw["score"].update(stage1_steps=1, stage2_steps=1)
        raw["optim"].update(prompts_per_step=2, prompts_per_micro_batch=1)
        raw["rollout"].update(samples_per_prompt=2)
    return config_from_dict(raw, source="score demo")


def to_toml(cfg: RunConfig) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
def evaluate_model(model, tokenizer, cfg: RunConfig, problems, progress: bool):
    from .trainer import prompt_builder

    reward = BatchReward(cfg.reward.kind)
    engine = Engine(model, max_num_seqs=cfg.rollout.max_num_seqs)
    return evaluate(engine, prompt_builder(cfg, tokenizer), problems, reward,
                    max_tokens=cfg.run.eval_max_tokens, progress=progress)


def run_rl(name: str, cfg: RunConfig, run_dir: Path, eval_problems, progress: bool):
    """Stage I + II with the real trainer, then the greedy evaluation of the trained policy."""
    from .trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    trainer = Trainer(cfg, run_dir)
    try:
        trainer.fit()
        metrics, records = evaluate(trainer.engine, trainer.builder, eval_problems, trainer.reward,
                                    max_tokens=cfg.run.eval_max_tokens, progress=progress)
    finally:
        trainer.close()
    return metrics, records


def run_demo(out_dir: str | Path, *, ablations: bool = False, quick: bool = False, seed: int = 0,
             progress: bool = True) -> dict:
    """The whole demo; returns the results dict written to DIR/results.json.

    It runs on one intra-op thread so that its numbers reproduce on any core count: with more threads
    float reductions are ordered differently, and the tiny model's training amplifies last-bit
    differences (seed 0 on 2 threads ended at Δ −0.8 instead of the +3.5 that 1 thread gives).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out_dir, ablations=ablations, quick=quick, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir, *, ablations: bool, quick: bool, seed: int, progress: bool) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    started = time.perf_counter()
    torch.manual_seed(seed)

    tokenizer = build_tokenizer(sizes.vocab, seed)
    builder = PromptBuilder(tokenizer, chat=False, system_prompt=None,
                            correction_instruction=demo_task.CORRECTION_INSTRUCTION)
    model = build_model(tokenizer, sizes)
    warmup_loss = warm_up(model, builder, sizes, seed, progress)
    base_dir = out / "base"
    save_pretrained(model, base_dir)
    tokenizer.save_pretrained(base_dir)

    train_problems = demo_task.problems(sizes.rl_train_problems, "train", seed)
    train_file = write_problems(out / "data" / "train.jsonl", train_problems)
    eval_problems = demo_task.problems(sizes.eval_problems, "eval", seed)
    eval_file = write_problems(out / "data" / "eval.jsonl", eval_problems)
    cfg = demo_config(base_dir, train_file, eval_file, seed, quick)
    cfg.run.progress = progress
    from .trainer import load_problems
    eval_set = load_problems(cfg, str(eval_file))

    base_metrics, base_records = evaluate_model(model, tokenizer, cfg, eval_set, progress)
    write_records(out / "eval_base.jsonl", base_records)
    rows = {"Base model": base_metrics}
    results = {"base": base_metrics}

    score_metrics, score_records = run_rl("SCoRe", cfg, out / "score", eval_set, progress)
    from .plots import plot_run

    plots = plot_run(out / "score" / "metrics.jsonl", out / "plots")
    write_records(out / "eval_score.jsonl", score_records)
    rows["SCoRe"] = score_metrics
    results["score"] = score_metrics
    if ablations:
        variants = {
            "no Stage I": ("no_stage1", dict(stage1_steps=0, stage2_steps=cfg.total_steps)),
            "no reward shaping": ("no_shaping", dict(alpha=0.0)),
        }
        for name, (key, change) in variants.items():
            ab_cfg = demo_config(base_dir, train_file, eval_file, seed, quick, **change)
            if quick:
                ab_cfg.score.stage2_steps = ab_cfg.score.stage2_steps if key != "no_stage1" else 2
            ab_cfg.run.progress = progress
            m, recs = run_rl(name, ab_cfg, out / key, eval_set, progress)
            write_records(out / f"eval_{key}.jsonl", recs)
            rows[name] = m
            results[key] = m
    results["warmup_loss"] = warmup_loss
    results["seed"] = seed
    results["quick"] = quick
    results["wall_s"] = time.perf_counter() - started
    results["plots"] = [str(p) for p in plots]
    write_json(out / "results.json", results)
    print(table(rows, title=f"Demo (sums of four numbers from 10 to 29, greedy, n={len(eval_set)} held-out problems, "
                            f"seed {seed})"))
    print(f"wall time {results['wall_s']:.0f} s; results in {out / 'results.json'}")
    return results
