"""`score sft`: the paper's supervised self-correction baselines (§4, Table 1) on self-generated data.

Both build two-attempt traces `[prompt, attempt 1, instruction, attempt 2]` and train the cross-entropy
of attempt 2's tokens only (attempt 1 and the instruction are context), through the same packing and
fused log-prob kernel as the RL loss (loss.pack, loss.attempt_logprobs; no [tokens, vocab] logits):

- **STaR** (D_StaR): the model samples k two-attempt traces per problem; the traces whose attempt 2
  is right after a wrong attempt 1 are kept. With `include_correct` (D⁺_StaR) right-then-right
  traces are kept too. Several rounds: round i samples with round i - 1's model and, as in STaR,
  fine-tunes the base model afresh on what it kept (the paper runs 3). A round that keeps no trace
  trains nothing and leaves the model as it was (reported, with every round's counts).
- **Pair-SFT** (D_SFT): the base model samples k first attempts per problem; each wrong one is
  paired, as (attempt 1, attempt 2), with a right one of the same problem. With `include_correct`
  (D⁺_SFT) each right one is also paired with another right one (itself when it is the only one).
  One round.

Round i's traces go to `OUT/data/round{i}.jsonl` (id, attempt1, attempt2, r1, r2), per-step metrics to
`OUT/metrics.jsonl`, the trained model to `OUT/final/`, then the counts of every round to
`OUT/sft_data.json`; with `data.eval` the run ends with the greedy two-attempt evaluation, as `score
train`. A killed run is started again from round 0 by `score sft --resume` (run_sft).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from score.model import from_pretrained, save_pretrained
from score.model.files import atomic_folder, write_json, write_jsonl

from .config import RunConfig
from .factories import make_engine, make_reward, pick_device, with_local_model
from .loss import attempt_logprobs, pack
from .precision import Precision, final_dtype
from .preflight import (
    check_finite,
    check_out_dir,
    check_wandb,
)
from .progress import progress_bar
from .prompts import PromptBuilder
from .rollout import RolloutSpec, Trajectory, run_rollout
from .run_inputs import SKIPPED_FILE, report_skipped, run_inputs
from .run_lock import claim_folder
from .run_log import WANDB_ID_FILE, MetricsLogger
from .run_record import RUN_RECORD, check_same_run, holds_a_run, run_record
from .schedule import lr_schedule, step_seed
from .trainer import RunFailed, wandb_settings


# ---------------------------------------------------------------------------------------------------
# The datasets
# ---------------------------------------------------------------------------------------------------
def star_traces(trajectories: Sequence[Trajectory], include_correct: bool) -> list[Trajectory]:
    """The two-attempt traces STaR trains on: wrong then right (and right then right with
    `include_correct`), with attempt 1 as context."""
    keep = [t for t in trajectories if _kept(*t.rewards, include_correct)]
    return [dataclasses.replace(t, group=i, first_from_base=True) for i, t in enumerate(keep)]


def _kept(r1: float, r2: float, include_correct: bool) -> bool:
    """Whether a two-attempt trace is trained on: wrong then right (or right then right with `include_correct`)."""
    return r2 == 1.0 and (r1 == 0.0 or (include_correct and r1 == 1.0))


def pair_sft_traces(
    samples: Sequence[Trajectory], builder: PromptBuilder, include_correct: bool, seed: int
) -> list[Trajectory]:
    """Pair-SFT's traces from single-attempt `samples` (attempt 1 only): every wrong sample of a
    problem followed by a right sample of the same problem (seeded choice), and with
    `include_correct` every right sample followed by another right one (itself when alone)."""
    by_problem: dict[str, list[Trajectory]] = {}
    for s in samples:
        by_problem.setdefault(s.problem.id, []).append(s)
    rng = random.Random(f"{seed}/pair_sft")
    traces = []
    for group in by_problem.values():
        right = [s for s in group if s.rewards[0] == 1.0]
        if not right:
            continue
        for s in group:
            if s.rewards[0] == 0.0:
                traces.append(_pair(s, rng.choice(right), builder))
            elif include_correct and s.rewards[0] == 1.0:
                others = [o for o in right if o is not s] or [s]
                traces.append(_pair(s, rng.choice(others), builder))
    return [dataclasses.replace(t, group=i) for i, t in enumerate(traces)]


def _pair(first: Trajectory, second: Trajectory, builder: PromptBuilder) -> Trajectory:
    """A trace whose attempt 1 is `first`'s attempt and attempt 2 is `second`'s (token ids)."""
    one, two = first.attempts[0], second.attempts[0]
    context, (a, b) = builder.second_attempt_ids(first.prompt_ids, one.ids, one.finish)
    attempts = [one, dataclasses.replace(two, instruction_ids=context[a:b])]
    return Trajectory(
        group=0, problem=first.problem, prompt_ids=first.prompt_ids, attempts=attempts, first_from_base=True
    )


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------
def sft_loss(model, traces: Sequence[Trajectory], denominator: float, precision: Precision) -> torch.Tensor:
    """Summed NLL of the traces' trained tokens over `denominator`: one packed forward. Only attempt-2
    tokens are trained (the traces' attempt 1 is context: `first_from_base`)."""
    batch = pack(list(traces), precision.device)
    return -attempt_logprobs(model, batch, 1.0, precision.autocast).sum() / denominator


def trained_tokens(traces: Sequence[Trajectory]) -> int:
    return sum(sum(1 for label in t.attempt_labels if label) for t in traces)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def run_sft(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    progress: bool | None = None,
    resume: bool = False,
    allow_config_change: bool = False,
    require_training: bool = True,
) -> Path:
    """The whole `score sft` run; returns the final model folder.

    The run holds its folder (run_lock.py) and records run.json as `score train` does. It keeps no
    checkpoints inside a run: `resume` starts a killed run again from round 0 (after checking that the
    folder holds the same run), and does nothing to a finished one. A run whose every round kept no
    trace trained nothing: RunFailed, and no final/, unless `require_training` is off (the demo's
    quick pipeline check, whose tiny models keep none)."""
    if not cfg.model.path:
        raise ValueError("model.path is empty: point it at an HF-format model folder")
    if not cfg.data.train:
        raise ValueError("data.train is empty: point it at a JSONL file of training problems or a builtin: source")
    requested = cfg.model.path
    cfg = with_local_model(cfg)
    check_wandb(cfg)  # before any folder is written
    with claim_folder(out_dir):
        out = check_out_dir(out_dir)
        record = run_record(cfg, out) | {"model": {"requested": requested, "path": cfg.model.path}}
        held = holds_a_run(out) or ("sft_data.json" if (out / "sft_data.json").exists() else None)
        if held and not resume:
            raise FileExistsError(
                f"{out} already holds a run ({held}); use --resume (a killed score sft starts again from round 0) "
                "or a new --out"
            )
        if resume:
            check_same_run(out, record, allow_config_change)
            if _finished(out, cfg):
                print(f"score sft --resume: {out} holds a finished run; nothing to do", flush=True)
                return out / "final"
            if held:
                print(
                    f"score sft --resume: score sft keeps no checkpoints inside a run; the run in {out} starts "
                    "again from round 0",
                    flush=True,
                )
        return _run(cfg, out, record, progress, require_training)


def _finished(out: Path, cfg: RunConfig) -> bool:
    """final/ (written whole), then sft_data.json, then the evaluation's metrics when data.eval is set."""
    done = (out / "final" / "config.json").is_file() and (out / "sft_data.json").is_file()
    return done and (not cfg.data.eval or (out / "eval_metrics.json").is_file())


def _run(cfg: RunConfig, out: Path, record: dict, progress: bool | None, require_training: bool) -> Path:
    progress = cfg.run.progress if progress is None else progress
    s, seed = cfg.sft, cfg.run.seed
    torch.manual_seed(seed)
    precision = Precision.of(cfg, pick_device(cfg.model.device))
    inputs = run_inputs(cfg, max_problems=s.max_problems)
    builder, problems, longest = inputs.builder, inputs.problems, inputs.max_model_len
    base = from_pretrained(cfg.model.path, dtype=precision.master_dtype, device=precision.device)
    base.requires_grad_(False).set_kernels(precision.kernels)
    check_finite(base, cfg.model.path)
    # What an earlier (killed) run left goes before this one writes anything of its own.
    for stale in ("metrics.jsonl", "sft_data.json", "eval.jsonl", "eval_metrics.json", SKIPPED_FILE, WANDB_ID_FILE):
        (out / stale).unlink(missing_ok=True)
    for stale in ("final", "data"):
        shutil.rmtree(out / stale, ignore_errors=True)
    write_json(out / RUN_RECORD, record)
    report_skipped(out, inputs.skipped)
    reward = make_reward(cfg)
    logger = MetricsLogger(out, wandb=wandb_settings(cfg, out))
    rounds, step, policy = [], 0, base
    try:
        for i in range(s.rounds):
            t0 = time.perf_counter()
            traces, sampled = build_round(
                cfg, policy, builder, problems, reward, step_seed(seed, 1000 + i), max_model_len=longest
            )
            write_jsonl(out / "data" / f"round{i}.jsonl", (_trace_row(t) for t in traces))
            counts = _round_counts(i, sampled, traces, cfg, time.perf_counter() - t0)
            if traces:
                policy = copy.deepcopy(base).requires_grad_(True).train()
                step, counts["skipped_steps"], last_loss = train_round(
                    cfg, policy, traces, logger, step, i, precision, progress
                )
                policy.eval()
                trained = f"{counts['steps']} steps, last loss {last_loss:.3f}"
            else:  # nothing to learn from: the round leaves the model as it was, and says so
                counts["steps"] = counts["skipped_steps"] = 0
                trained = "nothing trained (the model stays as it was)"
            rounds.append(counts)
            print(
                f"sft round {i}: {counts['traces']} {s.kind} traces from {counts['sampled']} samples; {trained}",
                flush=True,
            )
        if require_training and not any(r["steps"] for r in rounds):
            raise RunFailed(
                f"no round of {s.kind} kept a trace (see {out / 'data'}): nothing was trained, and no final/ is written"
            )
        final = out / "final"
        with atomic_folder(final) as tmp:
            save_pretrained(policy, tmp, final_dtype(cfg, cfg.model.path))
            inputs.tokenizer.save_pretrained(tmp)
        write_json(out / "sft_data.json", {"kind": s.kind, "include_correct": s.include_correct, "rounds": rounds})
        if cfg.data.eval:
            from .trainer import finish_run

            engine = make_engine(cfg, policy, max_model_len=longest)
            finish_run(cfg, out, engine, builder, reward, label=f"SFT ({s.kind})", logger=logger)
    finally:
        logger.close()
        reward.close()
    return final


def build_round(
    cfg: RunConfig, model, builder, problems, reward, seed: int, *, max_model_len: int | None = None
) -> tuple[list[Trajectory], list]:
    """(traces, the samples they came from) of one round, sampled from `model` by an engine of sequences
    up to `max_model_len` tokens."""
    s = cfg.sft
    spec = RolloutSpec.from_config(cfg.rollout, attempts=2 if s.kind == "star" else 1, seed=seed)
    sampled, _ = run_rollout(make_engine(cfg, model, max_model_len=max_model_len), builder, problems, reward, spec)
    if s.kind == "star":
        return star_traces(sampled, s.include_correct), sampled
    return pair_sft_traces(sampled, builder, s.include_correct, seed), sampled


def train_round(
    cfg: RunConfig, policy, traces, logger, step: int, round_index: int, precision: Precision, progress: bool
):
    """AdamW over `epochs` seeded shuffles of `traces`, from the weights `policy` holds; returns
    (the next global step, steps skipped for a non-finite loss or gradient, the last loss)."""
    s, o = cfg.sft, cfg.optim
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    per_epoch = math.ceil(len(traces) / s.batch_size)
    total, skipped = per_epoch * s.epochs, 0
    bar = None
    if progress:
        bar = progress_bar(total, f"sft round {round_index}", "step")
    clip = o.grad_clip if o.grad_clip > 0 else float("inf")
    for local in range(total):
        epoch, b = divmod(local, per_epoch)
        order = list(range(len(traces)))
        random.Random(f"{cfg.run.seed}/sft/{round_index}/{epoch}").shuffle(order)
        batch = [traces[j] for j in order[b * s.batch_size : (b + 1) * s.batch_size]]
        lr = lr_schedule(local, o, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        denominator, loss = float(trained_tokens(batch)), 0.0
        for m in range(0, len(batch), s.micro_batch_size):
            part = sft_loss(policy, batch[m : m + s.micro_batch_size], denominator, precision)
            part.backward()
            loss += float(part.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), clip))
        ok = math.isfinite(loss) and math.isfinite(grad_norm)
        if ok:
            optimizer.step()
        else:
            skipped += 1
        step += 1
        metrics = {"round": round_index, "epoch": epoch, "lr": lr, "loss": loss, "grad_norm": grad_norm}
        logger.log(step, metrics | {"skipped": int(not ok), "traces": len(batch), "tokens": int(denominator)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    if bar is not None:
        bar.close()
    if skipped == total:
        raise RuntimeError(f"sft round {round_index}: every one of {total} steps had a non-finite loss or gradient")
    return step, skipped, loss


def _round_counts(i: int, sampled, traces, cfg: RunConfig, seconds: float) -> dict:
    star = cfg.sft.kind == "star"
    r1 = [t.rewards[0] for t in sampled]
    counts = {
        "round": i,
        "sampled": len(sampled),
        "traces": len(traces),
        "acc_t1_sampled": sum(r1) / len(r1),
        "wrong_to_right": sum(t.rewards == [0.0, 1.0] for t in traces),
        "right_to_right": sum(t.rewards == [1.0, 1.0] for t in traces),
        "sample_s": seconds,
        "steps": math.ceil(len(traces) / cfg.sft.batch_size) * cfg.sft.epochs,
    }
    if star:
        counts["acc_t2_sampled"] = sum(t.rewards[1] for t in sampled) / len(sampled)
    return counts


def _trace_row(t: Trajectory) -> dict:
    one, two = t.attempts
    return {"id": t.problem.id, "attempt1": one.text, "attempt2": two.text, "r1": one.reward, "r2": two.reward}
