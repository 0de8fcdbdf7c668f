"""`score demo`: the base model, its headroom, every method x seed, the tables and plots."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from score.model import (
    save_pretrained,
)
from score.model.files import write_json, write_jsonl

from ..evaluate import evaluate_self_refine
from ..factories import load_problems, make_engine, make_reward, prompt_builder, self_refine_builders
from ..metrics import format_table
from ..run_inputs import run_inputs
from ..run_lock import claim_folder
from . import task as demo_task
from .base_model import build_model, build_tokenizer, warm_up, write_problems
from .diagnostics import evaluate_both
from .folder import check_demo_folder, claim_demo_folder
from .measure import headroom, pick, run_dirs, run_jobs, summarize
from .settings import FULL, LABELS, METHODS, QUICK, SFT_BASELINES, DemoSizes, demo_config


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
    # the base model and the data checked as every run will read them, before the first run starts
    eval_set, train_set = load_problems(cfg, cfg.data.eval), run_inputs(cfg).problems[: sizes.eval_problems]
    warmup_s = time.perf_counter() - started

    # Headroom and the base model's self-correction, before any RL, on held-out and training problems.
    room, room_rows = headroom(model, builder, eval_set, cfg)
    write_jsonl(out / "eval" / "headroom.jsonl", room_rows)
    room_train, room_train_rows = headroom(model, builder, train_set, cfg)
    write_jsonl(out / "eval" / "headroom_train.jsonl", room_train_rows)
    reward = make_reward(cfg)
    try:
        (base_metrics, base_records), (base_train, base_train_records) = evaluate_both(
            make_engine(cfg, model), builder, eval_set, train_set, reward, cfg.eval_budgets
        )
    finally:
        reward.close()
    write_jsonl(out / "eval" / f"base_seed{seed}.jsonl", base_records)
    write_jsonl(out / "eval" / f"base_seed{seed}_train.jsonl", base_train_records)
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
        write_jsonl(out / "eval" / f"self_refine_seed{seed}.jsonl", refined[0][1])
        write_jsonl(out / "eval" / f"self_refine_seed{seed}_train.jsonl", refined[1][1])
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
    from ..plots import plot_collapse, plot_demo

    rl_jobs = [job for job in jobs if job["name"] not in SFT_BASELINES]  # the SFT logs hold no rewards
    plots = plot_demo(results, run_dirs(rl_jobs), out / "plots", labels=LABELS)
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
