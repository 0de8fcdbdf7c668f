"""SCoRe training: Stage I, then Stage II, on one model object shared by the engine and the optimizer.

One optimizer step:
1. the step's prompts (schedule.py: a seeded per-epoch permutation, a function of the step alone)
   -> k trajectories each (two attempts, or `score.attempts`) from the engine (rollout.py), rewarded;
2. per micro-batch of whole prompt groups: one packed forward of `[x, y1, p, y2, ...]` per trajectory
   under the policy and under the frozen reference (no grad); the returns table of the stage, the
   RLOO baseline and the global token-mean (loss.py: the denominator counts the whole step's tokens,
   so accumulation equals one big batch); backward;
3. a non-finite loss or gradient norm skips the step (logged); else clip, AdamW step;
4. the engines' KV pools are freed for the backward pass (`sleep`, back at the next rollout) and
   `engine.clear_cache()` (cached K/V belong to the old weights); metrics JSONL; checkpoints.

Sampling seeds are keyed on (run seed, step) and the prompt/sample position, the learning rate
and the data position on the step, so a resumed run equals an uninterrupted one bit for bit on CPU.

How the step is spread over processes is the `Parallel` seam's business (parallel/seam.py): in one
process everything is local; under torchrun (`score train --nproc G`) every rank runs this same step
on its contiguous share of the prompt groups with FSDP2-sharded models gathered for the rollout,
sums gradients over the whole step's denominator (G ranks compute the 1-rank step), gathers the
metrics, and writes sharded checkpoints and a consolidated `final/`.
Not done: PPO-style multiple epochs per batch, adaptive beta2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import time
from pathlib import Path

import torch

from score.model import Engine
from score.model.files import commit_folder, temp_folder, write_json

from .config import RunConfig
from .factories import load_problems, make_engine, make_reward, with_local_model
from .loss import loss_denominator, micro_batch_loss, pack, uses_star
from .metrics import two_attempt_metrics
from .micro_batches import by_prompt_count, by_token_budget, groups_of
from .parallel.seam import Parallel, SingleProcess, parallel_for_run
from .precision import final_dtype
from .preflight import (
    check_finite,
    check_out_dir,
    check_wandb,
)
from .progress import progress_bar
from .prompts import PromptBuilder
from .ranks import raise_on_all_ranks
from .rewards.batch import answer_reader
from .rollout import RolloutSpec, RolloutStats, Trajectory, run_rollout
from .run_inputs import report_skipped, run_inputs
from .run_lock import claim_folder, lock_folder
from .run_log import MetricsLogger
from .run_record import RUN_RECORD, check_same_run, holds_a_run, run_record
from .schedule import DataOrder, attempts_at, lr_at, stage1_part, stage_of, step_seed


@dataclasses.dataclass
class StepTotals:
    """What one step's training pass adds up, over every process (the metrics' raw material)."""

    loss: float
    grad_norm: float
    skipped: bool
    kl: torch.Tensor  # [S, 2] sequence KL per trajectory and attempt
    returns: torch.Tensor  # [S, 2]
    tokens: int  # packed tokens through the policy
    seconds: float
    entropy: float  # mean over attempt tokens
    logp_gap: float  # mean |trainer logp - sampler logp| over attempt tokens


def wandb_settings(cfg: RunConfig, out_dir: Path) -> dict | None:
    """MetricsLogger's Weights & Biases settings of a run (None when run.wandb is off)."""
    if not cfg.run.wandb:
        return None
    return {"project": cfg.run.wandb_project, "name": cfg.run.wandb_name or out_dir.name, "config": cfg.to_dict()}


class RunFailed(RuntimeError):
    """A run that ended without training anything (the CLI exits 1 with this one line)."""


class Trainer:
    """Owns the policy, the frozen reference, the engines and the optimizer of one run (of one rank
    of a torchrun job when `parallel` is an FSDP2)."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        parallel: Parallel | None = None,
        allow_config_change: bool = False,
    ):
        if not cfg.model.path:
            raise ValueError("model.path is empty: point it at an HF-format model folder")
        if not cfg.data.train:
            raise ValueError("data.train is empty: point it at a JSONL file of training problems or a builtin: source")
        requested = cfg.model.path  # a folder or a Hub id; the run uses (and records) its local snapshot
        cfg = with_local_model(cfg)
        if parallel is None:
            parallel = SingleProcess.for_run(cfg)
        if cfg.score.attempts > 2 and not isinstance(parallel, SingleProcess):
            raise NotImplementedError(
                "score.attempts > 2 runs in one process: its Stage I anchor models are not sharded yet"
            )
        parallel.my_groups(cfg.optim.prompts_per_step)  # optim.prompts_per_step must split evenly
        self.cfg, self.parallel = cfg, parallel
        self.is_main = parallel.is_main
        check_wandb(cfg)  # before any folder is written
        # One run, one folder: the main process holds it (run_lock.py) before anything is written there.
        self._lock, error = None, None
        if self.is_main:
            try:
                self._lock = claim_folder(out_dir)
            except ValueError as e:
                error = str(e)
        raise_on_all_ranks(error)
        try:
            self._start(out_dir, requested, resume, allow_config_change)
        except BaseException:
            self._release()
            raise

    def _start(self, out_dir, requested: str, resume: bool, allow_config_change: bool) -> None:
        cfg, parallel = self.cfg, self.parallel
        self.out_dir = check_out_dir(out_dir)
        parallel.check_shared(self.out_dir)  # several nodes: --out must be on a file system they share
        held = holds_a_run(self.out_dir)  # checked before any model or worker is made
        if held and not resume:
            raise FileExistsError(f"{self.out_dir} already holds a run ({held}); use --resume or a new --out")
        record = run_record(cfg, self.out_dir) | {"model": {"requested": requested, "path": cfg.model.path}}
        if resume:
            check_same_run(self.out_dir, record, allow_config_change)
        # Everything the run reads is checked before the first model is built; data.eval is among
        # it, since the same engines evaluate the trained policy at the end.
        inputs = run_inputs(cfg)
        self.tokenizer, self.builder, self.problems = inputs.tokenizer, inputs.builder, inputs.problems
        self.max_model_len = inputs.max_model_len
        self.device = parallel.device
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.policy, self.reference = parallel.build_models(cfg)
        bad = 0
        try:
            check_finite(self.policy, cfg.model.path)
        except ValueError as e:
            bad, message = 1, str(e)
        if parallel.sum([bad])[0]:  # every rank stops, not only the one holding the bad shard
            raise ValueError(message if bad else f"{cfg.model.path}: another rank's weights hold NaN or Inf values")
        self.policy.set_activation_checkpointing(cfg.model.activation_checkpointing)
        self.reference.set_activation_checkpointing(False)
        self.order = DataOrder(len(self.problems), cfg.optim.prompts_per_step, cfg.run.seed, cfg.data.shuffle)
        self.rollout_spec = RolloutSpec.from_config(cfg.rollout)
        self.engine = self.base_engine = None  # built at the first rollout (sharded: on gathered weights)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.step = 0
        if resume:
            try:
                self.step = parallel.resume(self.out_dir, self.policy, self.optimizer)
            except FileNotFoundError as e:  # killed before its first checkpoint, or none readable: start again
                if self.is_main:
                    shutil.rmtree(self.out_dir / "anchors", ignore_errors=True)  # the old run's Stage I parts
                    print(f"{e}; the run starts again from step 0", flush=True)
                parallel.barrier()
        if self.is_main:
            write_json(self.out_dir / RUN_RECORD, record)
            report_skipped(self.out_dir, inputs.skipped)
        self.anchor = None  # the model that ended the previous part of Stage I (score.attempts > 2)
        self._anchor_part = 1
        parallel.barrier()  # every rank has checked metrics.jsonl before rank 0 opens it
        self.reward = make_reward(cfg)  # its workers start once nothing above can fail
        self._trained_steps = 0
        self.logger = (
            MetricsLogger(
                self.out_dir,
                tensorboard=cfg.run.tensorboard,
                resume_step=self.step if resume else None,
                wandb=wandb_settings(cfg, self.out_dir),
            )
            if self.is_main
            else None
        )
        self._closed = False

    @contextlib.contextmanager
    def generation(self, base: bool = False):
        """The policy's engine (and the reference's, when `base`) on generation-ready weights."""
        with self.parallel.generation(*((self.policy, self.reference) if base else (self.policy,))):
            if self.engine is None:  # built on gathered weights (FSDP2): they are in the compute dtype
                self.engine = make_engine(self.cfg, self.policy, max_model_len=self.max_model_len)
            if base and self.base_engine is None:
                self.base_engine = make_engine(self.cfg, self.reference, max_model_len=self.max_model_len)
            for engine in (self.engine, self.base_engine if base else None):
                if engine is not None and engine.sleeping:
                    engine.wake()
            yield self.engine

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, step, par = self.cfg, self.step, self.parallel
        stage = stage_of(step, cfg)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        part = stage1_part(step, cfg) if stage == 1 else 1
        self._update_anchor(part)
        trajectories, rollout = self._rollout(step, stage)
        for engine in (self.engine, self.base_engine):  # the KV pools are not held through the backward
            if engine is not None:
                engine.sleep()
        totals = self._train(trajectories, stage, part)
        self.engine.clear_cache()
        self.step += 1
        # Every rank's trajectories and statistics, in whole-batch order.
        trajectories = par.gather(trajectories)
        rollout.seconds, rollout.reward_seconds = par.max([rollout.seconds, rollout.reward_seconds])
        rollout.generated_tokens = int(par.sum([rollout.generated_tokens])[0])
        return self._metrics(trajectories, rollout, stage, lr, totals)

    def _update_anchor(self, part: int) -> None:
        """Stage I part j >= 2 holds attempts 1..j at the model that ended part j - 1: taken when the
        part starts and saved (`anchors/part{j-1}/`) so a resumed run loads the same one."""
        if part == self._anchor_part:
            return
        folder = self.out_dir / "anchors" / f"part{part - 1}"
        precision = self.parallel.precision
        if (folder / "config.json").exists():
            from score.model import from_pretrained

            self.anchor = from_pretrained(folder, dtype=precision.compute_dtype, device=self.device)
            self.anchor.set_kernels(precision.kernels)
        else:
            from score.model import save_pretrained

            self.anchor = precision.frozen_copy(self.policy)
            save_pretrained(self.anchor, folder)
        self.anchor.eval().requires_grad_(False)
        self._anchor_part = part

    def _rollout(self, step: int, stage: int) -> tuple[list[Trajectory], RolloutStats]:
        """This process's share of the step's prompt groups, k trajectories each, rewarded."""
        cfg, s = self.cfg, self.cfg.score
        indices = self.order.indices(step)
        mine = self.parallel.my_groups(len(indices))
        problems = [self.problems[indices[g]] for g in mine]
        mix = 1.0 if not s.online_first_attempt else s.base_first_attempt_mix if stage == 2 else 0.0
        mix_rng = random.Random(f"{cfg.run.seed}/mix/{step}")
        from_base = [mix_rng.random() < mix for _ in indices][mine.start : mine.stop] if mix > 0 else None
        spec = dataclasses.replace(
            self.rollout_spec,
            seed=step_seed(cfg.run.seed, step),
            attempts=1 if s.single_turn else attempts_at(step, cfg),
        )
        with self.generation(base=mix > 0) as engine:
            return run_rollout(
                engine,
                self.builder,
                problems,
                self.reward,
                spec,
                first=mine.start,
                base_engine=self.base_engine,
                from_base=from_base,
            )

    def _train(self, trajectories: list[Trajectory], stage: int, part: int = 1) -> StepTotals:
        """Accumulate the step's gradient over micro-batches, then clip and step (or skip)."""
        cfg, par = self.cfg, self.parallel
        t0 = time.perf_counter()
        (denominator,) = par.sum([loss_denominator(trajectories, cfg.score.normalization, uses_star(cfg, stage))])
        denominator = max(denominator, 1.0)  # a STaR step with no successful attempt trains nothing
        self.optimizer.zero_grad(set_to_none=True)
        loss, kls, rets, tokens, entropy_sum, gap_sum, n_active = 0.0, [], [], 0, 0.0, 0.0, 0
        for chunk in self._micro_batches(trajectories):
            batch = pack(chunk, self.device)
            out, logp, entropy = micro_batch_loss(
                self.policy, self.reference, batch, cfg, stage, denominator, par.autocast, part=part, anchor=self.anchor
            )
            out.loss.backward()
            loss += float(out.loss.detach())
            kls.append(out.kl.detach().float().cpu())
            rets.append(out.returns.detach().float().cpu())
            tokens += int(batch.input_ids.numel())
            entropy_sum += float(entropy.detach().float().sum())
            gap_sum += float((logp.detach().float() - batch.engine_logp).abs().sum())
            n_active += int(logp.numel())
        par.after_loss(self.reference)

        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = par.clip_grad_norm(self.policy, clip)  # the same float on every rank
        loss, tokens, entropy_sum, gap_sum, n_active = par.sum([loss, tokens, entropy_sum, gap_sum, n_active])
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)  # a NaN/Inf never reaches the weights
        else:
            self.optimizer.step()
        (seconds,) = par.max([time.perf_counter() - t0])
        return StepTotals(
            loss=loss,
            grad_norm=grad_norm,
            skipped=skipped,
            kl=par.gather_rows(torch.cat(kls)),
            returns=par.gather_rows(torch.cat(rets)),
            tokens=int(tokens),
            seconds=seconds,
            entropy=entropy_sum / max(1, n_active),
            logp_gap=gap_sum / max(1, n_active),
        )

    def _micro_batches(self, trajectories: list[Trajectory]) -> list[list[Trajectory]]:
        """This rank's micro-batches: by prompt count, or by token budget over every rank's groups."""
        o, par = self.cfg.optim, self.parallel
        if not o.tokens_per_micro_batch:
            return by_prompt_count(trajectories, o.prompts_per_micro_batch)
        groups = par.gather(groups_of(trajectories))
        return by_token_budget(groups, o.tokens_per_micro_batch, par.rank, par.world_size)

    def _metrics(
        self, trajectories: list[Trajectory], rollout: RolloutStats, stage: int, lr: float, totals: StepTotals
    ) -> dict:
        attempts = len(trajectories[0].attempts)  # 1 in single-turn RL: nothing to report about attempt 2
        rewards = [[t.attempts[n].reward for t in trajectories] for n in range(attempts)]
        binary = all(v in (0.0, 1.0) for column in rewards for v in column)
        kl, returns, seconds = totals.kl, totals.returns, totals.seconds
        m = {
            "stage": stage,
            "lr": lr,
            "loss": totals.loss,
            "grad_norm": totals.grad_norm,
            "skipped": int(totals.skipped),
        }
        for n in range(attempts):
            m[f"reward_{n + 1}"] = sum(rewards[n]) / len(trajectories)
        for n in range(attempts):
            m[f"kl_{n + 1}"] = float(kl[:, n].mean())
        for n in range(attempts):
            m[f"return_{n + 1}"] = float(returns[:, n].mean())
        m |= {"entropy": totals.entropy, "logp_gap": totals.logp_gap}
        for n in range(attempts):
            m[f"len_{n + 1}"] = sum(len(t.attempts[n].ids) for t in trajectories) / len(trajectories)
        m |= {
            "truncated_frac": sum(a.finish == "length" for t in trajectories for a in t.attempts)
            / (attempts * len(trajectories)),
            "rollout_tokens_per_s": rollout.tokens_per_s,
            "rollout_s": rollout.seconds,
            "reward_s": rollout.reward_seconds,
            "train_s": seconds,
            "train_tokens_per_s": totals.tokens / seconds if seconds > 0 else 0.0,
        }
        if binary and attempts >= 2:
            batch = two_attempt_metrics(
                rewards[0],
                rewards[1],
                answers1=[answer_reader(self.reward)(t.attempts[0].text) for t in trajectories],
                answers2=[answer_reader(self.reward)(t.attempts[1].text) for t in trajectories],
                texts1=[t.attempts[0].text for t in trajectories],
                texts2=[t.attempts[1].text for t in trajectories],
            )
            m.update(
                {
                    "acc_t1": batch["acc_t1"],
                    "acc_t2": batch["acc_t2"],
                    "delta": batch["delta"],
                    "delta_i2c": batch["delta_i2c"],
                    "delta_c2i": batch["delta_c2i"],
                    "changed_frac": batch["changed_frac"],
                    "edit_ratio": batch["edit_ratio"],
                }
            )
        if binary:
            for n in range(attempts):
                m.setdefault(f"acc_t{n + 1}", m[f"reward_{n + 1}"])
        if totals.skipped:
            m["skip_reason"] = "non-finite loss" if not math.isfinite(totals.loss) else "non-finite gradient"
        return m

    # -- the run -----------------------------------------------------------------------------------
    def save(self) -> Path:
        """A checkpoint of the current step (every rank calls it in a sharded run)."""
        state = {"stage": stage_of(max(0, self.step - 1), self.cfg), "data_step": self.step}
        return self.parallel.save(
            self.out_dir,
            self.step,
            self.policy,
            self.optimizer,
            state,
            keep_last=self.cfg.run.keep_last,
            tokenizer=self.tokenizer,
        )

    def fit(self, max_steps: int | None = None) -> Path:
        """Train to the end of Stage II (or `max_steps` steps in all); returns the final model folder."""
        cfg = self.cfg
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        bar = None
        if cfg.run.progress and end > self.step and self.is_main:
            bar = progress_bar(end, "SCoRe", "step", initial=self.step)
        first = self.step
        try:
            while self.step < end:
                metrics = self.train_step()
                self._trained_steps += 1 - metrics["skipped"]
                if self.logger is not None:
                    self.logger.log(self.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        stage=metrics["stage"],
                        r1=f"{metrics['reward_1']:.2f}",
                        r2=f"{metrics.get('reward_2', float('nan')):.2f}",
                        kl1=f"{metrics['kl_1']:.3f}",
                    )
                every = cfg.run.checkpoint_every
                if every and self.step % every == 0 and self.step < end:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        if end > first and not self._trained_steps:
            raise RunFailed(
                f"every one of the {end - first} steps was skipped (non-finite loss or gradient; see "
                f"{self.out_dir / 'metrics.jsonl'}): no checkpoint or final/ is written"
            )
        self.save()
        final = self.out_dir / "final"
        staging = temp_folder(final) if self.is_main else final  # final/ appears whole (other ranks write none)
        self.parallel.export(self.policy, staging, final_dtype(cfg, cfg.model.path))
        if self.is_main:
            self.tokenizer.save_pretrained(staging)
            commit_folder(staging, final)
        return final

    def close(self) -> None:
        """Closes the metrics log and the reward workers, and lets go of the run folder (safe to call again)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.logger is not None:
                self.logger.close()
            self.reward.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    allow_config_change: bool = False,
) -> Path:
    """`score train`: the whole run, then plots and (when data.eval is set) the greedy evaluation.

    Under torchrun every rank trains; then rank 0 alone plots and evaluates the exported `final/`
    policy while the other ranks exit (parallel/seam.py, `evaluation`)."""
    parallel = parallel_for_run(cfg)
    trainer = Trainer(cfg, out_dir, resume=resume, parallel=parallel, allow_config_change=allow_config_change)
    held = lock_folder(trainer.out_dir) if trainer.is_main else None  # through the evaluation, after close()
    try:
        final = trainer.fit(max_steps)
        with parallel.evaluation(trainer, final) as parts:
            if parts is not None:
                finish_run(cfg, trainer.out_dir, *parts, logger=trainer.logger)
    finally:
        trainer.close()
        if held is not None:
            held.release()
    return final


def finish_run(
    cfg: RunConfig,
    out_dir: Path,
    engine: Engine,
    builder: PromptBuilder,
    reward,
    *,
    label: str = "SCoRe",
    logger: MetricsLogger | None = None,
) -> None:
    """Plots of metrics.jsonl and, when data.eval is set, the greedy two-attempt evaluation."""
    if cfg.run.plots:
        from .plots import plot_run

        plot_run(out_dir / "metrics.jsonl", out_dir / "plots")
    if cfg.data.eval:
        from score.model.files import write_json, write_jsonl

        from .evaluate import evaluate, table

        problems = load_problems(cfg, cfg.data.eval)
        if cfg.run.eval_max_problems:
            problems = problems[: cfg.run.eval_max_problems]
        metrics, records = evaluate(
            engine,
            builder,
            problems,
            reward,
            budgets=cfg.eval_budgets,
            attempts=cfg.score.attempts,
            progress=cfg.run.progress,
        )
        write_jsonl(out_dir / "eval.jsonl", records)
        write_json(out_dir / "eval_metrics.json", metrics)
        if logger is not None and not logger.closed:
            logger.summary({"eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        print(table({label: metrics}))
