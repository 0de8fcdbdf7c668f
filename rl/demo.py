"""`score demo`: SCoRe end to end on CPU in minutes, with nothing downloaded, as an experiment.

1. A BPE tokenizer is trained on the demo task's texts (`tokenizers`), and a tiny Llama-style decoder
   (score.model.Transformer) is warmed up with supervised training on the procedural task of
   `demo_task.py` (the last digit of a sum of four digits): direct answers, worked answers, and
   two-attempt traces whose second attempts are careless, in the mixture of the chosen setting
   (`demo_task.SETTINGS`: `recall`, where the base model half-remembers the RL training problems,
   or `guess`). That base model is saved in HF format (`DIR/base`) and shared by every RL run.
2. Headroom, measured before any RL on the held-out and on the training problems: the base model's
   greedy accuracy with each answer path forced (direct within attempt 1's budget, worked within
   attempt 2's), and its own two-attempt self-correction (`DIR/eval/headroom{,_train}.jsonl`,
   `DIR/eval/base_seed{S}{,_train}.jsonl`).
3. SCoRe (Stage I then Stage II) from the base model with several RL seeds, through
   `rl.trainer.Trainer` exactly as `score train` runs it (`DIR/runs/NAME_seed{i}/`: config.toml,
   metrics.jsonl, final/); each trained policy is evaluated greedily on the held-out problems
   (`DIR/eval/NAME_seed{i}.jsonl`, one line per problem with `id`, `r1`, `r2`) and on the training
   problems (`..._train.jsonl`).
4. `--ablations` adds multi-turn RL (both attempts trained on their own rewards from the start: the
   baseline that collapses in the paper) and the paper's Table 4 rows, with the same budget:
   single-turn RL, no Stage I, no reward shaping, STaR instead of REINFORCE in Stage II, no online
   turn-1 samples (METHODS). `--baselines` adds the paper's Table 1-2 baselines: Self-Refine prompting
   the base model, and STaR / Pair-SFT with and without correct-to-correct data (`score sft`,
   SFT_BASELINES) per seed.
5. `DIR/results.json` holds the headroom and, per method, every seed's metrics on both problem sets,
   their mean and standard error, and the per-step collapse diagnostics (demo_diagnostics.py); the
   tables are printed with ± s.e.; `DIR/plots/` holds a bar chart, the training curves and the
   collapse diagnostics.

RL runs go to a pool of processes (one intra-op thread each). `--quick` shrinks everything to check
the pipeline in seconds (not the result).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from score.kernels import fused_linear_logprob
from score.model import (
    ModelConfig,
    SamplingParams,
    Tokenizer,
    Transformer,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)
from score.model.files import TEMP_PREFIX, read_json_object, write_jsonl

from . import demo_task
from .config import RunConfig, config_from_dict
from .demo_diagnostics import evaluate_both, mean_curves, run_curves
from .evaluate import evaluate_self_refine, write_json, write_records
from .factories import load_problems, make_engine, make_reward, prompt_builder, self_refine_builders
from .metrics import format_table, seed_summary
from .preflight import check_out_dir
from .progress import progress_bar
from .prompts import PromptBuilder
from .run_lock import LOCK_FILE, claim_folder, lock_folder
from .sft import run_sft
from .trainer import Trainer

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


# ---------------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """Byte-level BPE trained on the demo's texts; digits are always single tokens. Merges may cross
    spaces, so the fixed texts (prompt, instruction) become a few tokens each: short sequences."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(demo_task.tokenizer_corpus(2000, seed), trainer)
    return Tokenizer(backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def build_model(tokenizer: Tokenizer, sizes: DemoSizes) -> Transformer:
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=sizes.hidden,
        intermediate_size=3 * sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
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
        start = len(builder.tokenizer.encode(example.untrained_start)) if example.untrained_start else 0
        if second[:start] != builder.tokenizer.encode(example.untrained_start):
            raise RuntimeError(f"{example.untrained_start!r} does not tokenize as the start of {example.attempts[1]!r}")
        ids += second
        mask += [0] * start + [1] * (len(second) - start)
    return ids, mask


def warm_up(
    model: Transformer,
    builder: PromptBuilder,
    sizes: DemoSizes,
    seed: int,
    progress: bool,
    mix: demo_task.WarmupMix,
    recall: tuple[tuple[int, ...], ...],
) -> float:
    """Supervised warm-up on the demo task (`mix`, with `recall` its recall problems); returns the last
    loss. Packed sequences, no logits."""
    rng = random.Random(f"demo-warmup-{seed}")
    eos = builder.tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=sizes.warmup_lr, betas=(0.9, 0.98), weight_decay=0.0)
    bar = None
    if progress:
        bar = progress_bar(sizes.warmup_steps, "warm-up (supervised)", "step")
    loss_value = float("nan")
    for step in range(sizes.warmup_steps):
        ids, targets, mask, cu = [], [], [], [0]
        for _ in range(sizes.warmup_batch):
            seq, m = encode_warmup(demo_task.warmup_example(rng, mix, recall), builder, eos)
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
    return write_jsonl(path, ({"id": p.id, "problem": p.question, "answer": p.answer} for p in problems))


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


def to_toml(cfg: RunConfig) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------------------
def headroom(model, builder: PromptBuilder, problems, cfg: RunConfig) -> tuple[dict, list[dict]]:
    """Greedy accuracy of `model` on `problems` down each answer path, forced by appending the path's
    first words (token ids): `direct` in attempt 1 (its budget), `worked` in attempt 2 (its budget,
    after that direct attempt 1 and the instruction), where a self-correcting model would use it.
    Returns ({"direct": f, "worked": f}, per-problem rows)."""
    tokenizer, engine = builder.tokenizer, make_engine(cfg, model)
    stop = tuple(builder.stop_token_ids)
    direct, worked = tokenizer.encode(demo_task.DIRECT_PREFIX), tokenizer.encode(demo_task.WORKED_PREFIX)
    for name, ids, example in (
        ("direct", direct, demo_task.direct_answer(7)),
        ("worked", worked, demo_task.worked_solution((1, 2, 3, 4))),
    ):
        if tokenizer.encode(example)[: len(ids)] != ids:
            raise RuntimeError(f"the {name} prefix does not tokenize as the start of a {name} answer")

    def greedy(contexts, forced, budget):
        outs = engine.generate(
            [c + forced for c in contexts],
            SamplingParams(n=1, temperature=0.0, max_tokens=budget - len(forced), stop_token_ids=stop),
        )
        return [forced + list(o[0].token_ids) for o in outs], [o[0].finish_reason for o in outs]

    prompts = [builder.first_attempt_ids(p.question) for p in problems]
    first, finish = greedy(prompts, direct, cfg.rollout.max_tokens_attempt1)
    contexts = [builder.second_attempt_ids(p, a, f)[0] for p, a, f in zip(prompts, first, finish, strict=True)]
    second, _ = greedy(contexts, worked, cfg.rollout.max_tokens_attempt2)
    rows = []
    for p, a, b in zip(problems, first, second, strict=True):
        texts = [tokenizer.decode(x, skip_special_tokens=True) for x in (a, b)]
        rows.append(
            {
                "id": p.id,
                "direct": demo_task.check_answer(texts[0], p.answer),
                "worked": demo_task.check_answer(texts[1], p.answer),
                "direct_text": texts[0],
                "worked_text": texts[1],
            }
        )
    return {path: sum(r[path] for r in rows) / len(rows) for path in ("direct", "worked")}, rows


def train_and_evaluate(job: dict) -> dict:
    """One run of the demo (a process-pool job): Stage I + II with the real trainer (or, for an SFT
    baseline, `score sft`'s run), then the greedy two-attempt evaluation of the trained policy; its
    per-problem records go to job['records']."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = config_from_dict(job["config"], source=f"score demo ({job['name']}, seed {job['seed']})")
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    problem_sets = (load_problems(cfg, cfg.data.eval), load_problems(cfg, cfg.data.train)[: job["train_n"]])
    if job["name"] in SFT_BASELINES:
        held_out, training = _sft_and_evaluate(cfg, run_dir, problem_sets)
    else:
        trainer = Trainer(cfg, run_dir)
        try:
            trainer.fit()
            with trainer.generation() as engine:
                held_out, training = evaluate_both(
                    engine, trainer.builder, *problem_sets, trainer.reward, cfg.eval_budgets
                )
        finally:
            trainer.close()
    write_records(job["records"], held_out[1])
    write_records(job["train_records"], training[1])
    result = {"seed": job["seed"], **pick(held_out[0]), "train": pick(training[0])}
    if job["name"] not in SFT_BASELINES:  # the SFT logs hold no rewards or attempts
        result["curves"] = run_curves(run_dir)
    return result | {"wall_s": time.perf_counter() - started}


def pick(metrics: dict) -> dict:
    return {k: metrics[k] for k in RESULT_KEYS}


def _sft_and_evaluate(cfg: RunConfig, run_dir: Path, problem_sets) -> tuple[tuple, tuple]:
    """`score sft` without its own end-of-run evaluation, then the demo's evaluation of its model."""
    final = run_sft(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval="")),
        run_dir,
        progress=False,
        require_training=False,
    )
    model = from_pretrained(final, dtype=torch.float32)
    reward = make_reward(cfg)
    try:
        builder = prompt_builder(cfg, load_tokenizer(final))
        return evaluate_both(make_engine(cfg, model), builder, *problem_sets, reward, cfg.eval_budgets)
    finally:
        reward.close()


def run_jobs(jobs: list[dict], workers: int, progress: bool) -> list[dict]:
    """Run the RL jobs on `workers` processes (one intra-op thread each, so the results do not depend
    on how many run at once); results in job order."""
    bar = None
    if progress:
        bar = progress_bar(len(jobs), "runs", "run")
    results = [None] * len(jobs)

    def done(i, result):
        results[i] = result
        line = (
            f"{jobs[i]['name']} seed {result['seed']}: Acc@t1 {100 * result['acc_t1']:.1f}, "
            f"Acc@t2 {100 * result['acc_t2']:.1f} ({result['wall_s']:.0f} s)"
        )
        if bar is not None:
            bar.update(1)
            bar.write(line)
        else:
            print(line, flush=True)

    try:
        if workers <= 1:
            for i, job in enumerate(jobs):
                done(i, train_and_evaluate(job))
        else:
            with ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent,
                initargs=(os.getpid(),),
            ) as pool:
                futures = {pool.submit(train_and_evaluate, job): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    done(futures[future], future.result())
    finally:
        if bar is not None:
            bar.close()
    return results


def summarize(runs: list[dict]) -> dict:
    """A method's row: every seed's run, and the mean and standard error over seeds, on the held-out
    problems and (`train`) on the training problems; `curves`: the per-step series averaged over seeds."""
    mean, stderr = seed_summary(runs)
    train_mean, train_stderr = seed_summary([r["train"] for r in runs])
    row = {
        "seeds": runs,
        "mean": {**mean, "n": runs[0]["n"]},
        "stderr": stderr,
        "train": {"mean": {**train_mean, "n": runs[0]["train"]["n"]}, "stderr": train_stderr},
    }
    if all("curves" in r for r in runs):
        row["curves"] = mean_curves([r["curves"] for r in runs])
    return row


# ---------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------
def run_demo(
    out_dir: str | Path,
    *,
    ablations: bool = False,
    baselines: bool = False,
    quick: bool = False,
    seed: int = 0,
    seeds: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    setting: str = demo_task.DEFAULT_SETTING,
) -> dict:
    """The whole demo in one of demo_task.SETTINGS; returns the results dict written to DIR/results.json.

    Everything runs on one intra-op thread per process, so a machine computes the same numbers
    whatever its core count or `workers`; other CPUs round differently (their BLAS kernels), so
    digits differ across machines while the claims (mean ± s.e. over seeds) hold with margin.
    """
    if setting not in demo_task.SETTINGS:
        raise ValueError(f"--setting must be one of {sorted(demo_task.SETTINGS)}, got {setting!r}")
    sizes = QUICK if quick else FULL
    seeds = sizes.seeds if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if not 0 <= seed <= 2**31 - 1 - seeds:
        raise ValueError(f"--seed must be in [0, 2**31 - {seeds}) so that the {seeds} RL seeds fit, got {seed}")
    check_demo_folder(Path(out_dir), {"seed": seed, "quick": quick, "setting": setting})  # before the lock file is made
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with claim_folder(out_dir):  # one demo per folder; its runs' workers die with this process
            return _run_demo(
                Path(out_dir),
                sizes=sizes,
                ablations=ablations,
                baselines=baselines,
                quick=quick,
                seed=seed,
                seeds=seeds,
                workers=workers,
                progress=progress,
                setting=setting,
            )
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    out: Path,
    *,
    sizes: DemoSizes,
    ablations: bool,
    baselines: bool,
    quick: bool,
    seed: int,
    seeds: int,
    workers: int | None,
    progress: bool,
    setting: str,
) -> dict:
    out = claim_demo_folder(out, {"seed": seed, "quick": quick, "setting": setting})
    task = demo_task.SETTINGS[setting]
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    started = time.perf_counter()
    torch.manual_seed(seed)

    # The shared base model and the data.
    base_dir, train_file, eval_file = out / "base", out / "data" / "train.jsonl", out / "data" / "eval.jsonl"
    cfg = demo_config(base_dir, train_file, eval_file, seed, quick, prompts_per_step=task.prompts_per_step)
    tokenizer = build_tokenizer(sizes.vocab, seed)
    builder = prompt_builder(cfg, tokenizer)
    model = build_model(tokenizer, sizes)
    train = demo_task.problems(min(sizes.rl_train_problems, task.train_problems), "train", seed)
    recall = tuple(tuple(p.meta["operands"]) for p in train) if task.mix.recall else ()
    warmup_loss = warm_up(model, builder, sizes, seed, progress, task.mix, recall)
    save_pretrained(model, base_dir)
    tokenizer.save_pretrained(base_dir)
    write_problems(train_file, train)
    write_problems(eval_file, demo_task.problems(sizes.eval_problems, "eval", seed))
    eval_set = load_problems(cfg, str(eval_file))
    train_set = load_problems(cfg, str(train_file))[: sizes.eval_problems]
    warmup_s = time.perf_counter() - started

    # Headroom and the base model's self-correction, before any RL, on held-out and training problems.
    room, room_rows = headroom(model, builder, eval_set, cfg)
    write_records(out / "eval" / "headroom.jsonl", room_rows)
    room_train, room_train_rows = headroom(model, builder, train_set, cfg)
    write_records(out / "eval" / "headroom_train.jsonl", room_train_rows)
    reward = make_reward(cfg)
    try:
        (base_metrics, base_records), (base_train, base_train_records) = evaluate_both(
            make_engine(cfg, model), builder, eval_set, train_set, reward, cfg.eval_budgets
        )
    finally:
        reward.close()
    write_records(out / "eval" / f"base_seed{seed}.jsonl", base_records)
    write_records(out / "eval" / f"base_seed{seed}_train.jsonl", base_train_records)
    methods = {"base": summarize([{"seed": seed, **pick(base_metrics), "train": pick(base_train)}])}
    if baselines:  # Self-Refine prompts the base model: greedy, so one row like the base model's
        reward = make_reward(cfg)
        try:
            refined = [
                evaluate_self_refine(
                    make_engine(cfg, model),
                    builder,
                    self_refine_builders(cfg, builder),
                    problems,
                    reward,
                    budgets=cfg.eval_budgets,
                    critique_budget=cfg.self_refine.max_tokens_critique,
                )
                for problems in (eval_set, train_set)
            ]
        finally:
            reward.close()
        write_records(out / "eval" / f"self_refine_seed{seed}.jsonl", refined[0][1])
        write_records(out / "eval" / f"self_refine_seed{seed}_train.jsonl", refined[1][1])
        methods["self_refine"] = summarize([{"seed": seed, **pick(refined[0][0]), "train": pick(refined[1][0])}])
    for problems, paths, two in ((eval_set, room, base_metrics), (train_set, room_train, base_train)):
        print(
            f"headroom of the base model ({'held-out' if problems is eval_set else 'training'} problems, greedy, "
            f"n={len(problems)}): direct {100 * paths['direct']:.1f}%, worked {100 * paths['worked']:.1f}%; "
            f"two attempts: Acc@t1 {100 * two['acc_t1']:.1f}, Acc@t2 {100 * two['acc_t2']:.1f}",
            flush=True,
        )
    print(f"warm-up {warmup_s:.0f} s", flush=True)

    # RL (and the SFT baselines): every method x seed from the same base model, with the same budget.
    names = ["score"] + (list(METHODS)[1:] if ablations else []) + (list(SFT_BASELINES) if baselines else [])
    jobs = []
    for name in names:
        for i in range(seeds):
            change = {"sft": SFT_BASELINES[name][1]} if name in SFT_BASELINES else METHODS[name][1]
            run_cfg = demo_config(
                base_dir, train_file, eval_file, seed + i, quick, prompts_per_step=task.prompts_per_step, **change
            )
            jobs.append(
                {
                    "name": name,
                    "seed": seed + i,
                    "config": run_cfg.to_dict(),
                    "run_dir": str(out / "runs" / f"{name}_seed{seed + i}"),
                    "records": str(out / "eval" / f"{name}_seed{seed + i}.jsonl"),
                    "train_records": str(out / "eval" / f"{name}_seed{seed + i}_train.jsonl"),
                    "train_n": len(train_set),
                }
            )
    for job, result in zip(jobs, run_jobs(jobs, workers, progress), strict=True):
        methods.setdefault(job["name"], []).append(result)
    for name in names:
        methods[name] = summarize(methods[name])

    results = {
        "setting": setting,
        "headroom": room,
        "headroom_train": room_train,
        "methods": methods,
        "seed": seed,
        "seeds": seeds,
        "quick": quick,
        "warmup_loss": warmup_loss,
        "wall_s": time.perf_counter() - started,
    }
    from .plots import plot_collapse, plot_demo

    rl_jobs = [job for job in jobs if job["name"] not in SFT_BASELINES]  # the SFT logs hold no rewards
    plots = plot_demo(results, _run_dirs(rl_jobs), out / "plots", labels=LABELS)
    plots.append(plot_collapse(results, out / "plots", labels=LABELS))
    results["plots"] = [str(p) for p in plots]
    write_json(out / "results.json", results)
    over = f"RL mean ± s.e. over {seeds} seed{'s' if seeds > 1 else ''} from one base model"
    training = {name: m["train"] for name, m in methods.items()}
    for which, rows, n in (("held-out", methods, len(eval_set)), ("training", training, len(train_set))):
        print(
            format_table(
                {LABELS[name]: m["mean"] for name, m in rows.items()},
                stderr={LABELS[name]: m["stderr"] for name, m in rows.items()},
                title=f"Demo ({demo_task.TASK}, {task.about}; greedy, n={n} {which} problems; {over})",
            )
        )
    print(f"wall time {results['wall_s']:.0f} s; results in {out / 'results.json'}")
    return results


DEMO_RECORD = "demo.json"


def claim_demo_folder(out: Path, identity: dict) -> Path:
    """The demo's folder, checked before anything is written (the caller holds its lock): a folder
    holding another demo (another seed or size) or anything that is not a demo is refused; the same
    demo again replaces its runs, once the workers of an earlier demo have let go of them."""
    check_demo_folder(out, identity)
    runs = out / "runs"
    for run in sorted(runs.iterdir()) if runs.is_dir() else []:
        if run.is_dir():  # a killed demo's workers die with it; wait the moment they take to exit
            with lock_folder(run, what="run folder", wait_s=10.0):
                pass
    shutil.rmtree(runs, ignore_errors=True)  # the same demo again: its runs start over
    check_out_dir(out)
    write_json(out / DEMO_RECORD, identity)
    return out


def check_demo_folder(out: Path, identity: dict) -> None:
    """Refuse a path that is not a folder, a folder holding another demo, and a non-empty folder that
    holds no demo (its lock file and a killed writer's temporaries aside); reads only."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    record = out / DEMO_RECORD
    if record.is_file():
        held = read_json_object(record)
        if {k: held.get(k) for k in identity} != identity:
            raise FileExistsError(
                f"{out} holds the demo of {held}, not {identity}; it is kept: choose a new --out for this one"
            )
    elif out.is_dir() and any(c.name != LOCK_FILE and not c.name.startswith(TEMP_PREFIX) for c in out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no demo ({DEMO_RECORD}); choose a new --out")


def die_with_parent(parent: int) -> None:
    """A pool worker's initializer: the worker is killed when the demo's process ends, however it ends
    (a `kill -9` included), so no run goes on writing the demo's folder without it. Linux delivers
    SIGKILL on the parent's death (PR_SET_PDEATHSIG); elsewhere a thread watches the parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died before the request was made
            os._exit(1)
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run_dirs(jobs: list[dict]) -> dict[str, list[Path]]:
    dirs: dict[str, list[Path]] = {}
    for job in jobs:
        dirs.setdefault(job["name"], []).append(Path(job["run_dir"]))
    return dirs
