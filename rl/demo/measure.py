"""What the demo measures: the base model's headroom down each answer path, and each run (RL or an
SFT baseline, a process-pool job) trained and evaluated greedily on held-out and training problems,
summarised over seeds."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from score.model import (
    SamplingParams,
    from_pretrained,
    load_tokenizer,
)
from score.model.files import write_jsonl

from ..config import RunConfig, config_from_dict, to_toml
from ..factories import load_problems, make_engine, make_reward, prompt_builder
from ..metrics import seed_summary
from ..progress import progress_bar
from ..prompts import PromptBuilder
from ..sft import run_sft
from ..trainer import Trainer
from . import task as demo_task
from .diagnostics import evaluate_both, mean_curves, run_curves
from .settings import RESULT_KEYS, SFT_BASELINES


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
    write_jsonl(job["records"], held_out[1])
    write_jsonl(job["train_records"], training[1])
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


def run_dirs(jobs: list[dict]) -> dict[str, list[Path]]:
    """Each method's run folders, in seed order."""
    dirs: dict[str, list[Path]] = {}
    for job in jobs:
        dirs.setdefault(job["name"], []).append(Path(job["run_dir"]))
    return dirs
