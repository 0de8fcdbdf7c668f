"""SCoRe training: Stage I, then Stage II, on one model object shared by the engine and the optimizer.

One optimizer step (DESIGN.md §5):
1. the step's prompts (a seeded per-epoch permutation: the data position is a function of the
   step alone) -> k two-attempt trajectories each from the engine (rollout.py), rewarded;
2. per micro-batch of whole prompt groups: one packed forward of `[x, y1, p, y2]` per trajectory
   under the policy and under the frozen reference (no grad); `fused_linear_logprob` gives the
   log-probs of attempt tokens only (no [tokens, vocab] logits); `score_loss` applies DESIGN §1's
   returns table (stage I: attempt 1 gets -beta2 KL1, attempt 2 r2 - beta1 KL2; stage II:
   r1 - beta1 KL1 and r2 + alpha (r2 - r1) - beta1 KL2), the RLOO baseline, and the global
   token-mean (`loss_denominator` counts the whole step's tokens, so accumulation equals one big
   batch); backward;
3. a non-finite loss or gradient norm skips the step (logged); else clip, AdamW step;
4. `engine.clear_cache()` (cached K/V belong to the old weights); metrics JSONL; checkpoints.

Sampling seeds are keyed on (run seed, step) and the prompt/sample position, the learning rate
and the data position on the step, so a resumed run equals an uninterrupted one bit for bit on CPU.

Under torchrun (`score train --nproc G`, `Trainer(env=...)`) every rank runs this same step on its
contiguous share of the step's prompt groups (distributed.py): the policy and reference are
FSDP2-sharded; the policy (and the reference, for base-model first attempts) is all-gathered for
the rollout and resharded for training; seeds stay keyed on whole-batch positions; the loss
divides by the whole step's denominator and gradients are summed, so G ranks compute the 1-rank
step; metrics are gathered to every rank and rank 0 logs; checkpoints are DCP folders
(dist_checkpoint.py, resumable on any world size) and `final/` is a consolidated HF export.
Not done: PPO-style multiple epochs per batch, adaptive beta2.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from pathlib import Path

import torch

from score.kernels import fused_linear_logprob, score_loss
from score.model import Engine, from_pretrained, load_tokenizer, save_pretrained

from . import distributed as D
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig
from .data import Problem, load_jsonl
from .dist_checkpoint import export_consolidated, latest_sharded, load_sharded, save_sharded
from .math_reward import extract_final_answer
from .metrics import two_attempt_metrics
from .prompts import CODE_CORRECTION_INSTRUCTION, MATH_CORRECTION_INSTRUCTION, MATH_SYSTEM_PROMPT, PromptBuilder
from .rewards import BatchReward
from .rollout import Trajectory, two_attempt_rollout
from .run_log import MetricsLogger


# ---------------------------------------------------------------------------------------------------
# Pieces used by the trainer, evaluation and the CLI
# ---------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device = 'cuda' but CUDA is not available")
    return torch.device(name)


def prompt_builder(cfg: RunConfig, tokenizer) -> PromptBuilder:
    """The PromptBuilder of a run: 'default' = the paper's text for the reward kind, '' = none."""
    p = cfg.prompt
    code = cfg.reward.kind == "code"
    system = p.system_prompt
    if system == "default":
        system = None if code else MATH_SYSTEM_PROMPT
    instruction = p.correction_instruction
    if instruction == "default":
        instruction = CODE_CORRECTION_INSTRUCTION if code else MATH_CORRECTION_INSTRUCTION
    if not instruction:
        raise ValueError("prompt.correction_instruction must not be empty (attempt 2 needs an instruction)")
    return PromptBuilder(tokenizer, chat=p.chat, system_prompt=system or None, correction_instruction=instruction)


def load_problems(cfg: RunConfig, path: str) -> list[Problem]:
    """Problems of a data file for the run's reward kind (code: MBPP JSONL or 'humaneval')."""
    if cfg.reward.kind == "code":
        from .code_problems import load_humaneval, load_mbpp_jsonl

        raw = load_humaneval() if path == "humaneval" else load_mbpp_jsonl(path)
        out = []
        for p in raw:
            question = p["prompt"] if "entry_point" in p else p["text"] + "\n" + "\n".join(p["test_list"][:1])
            out.append(Problem(id=str(p["task_id"]), question=question, answer="", meta={"code": p}))
        return out
    d = cfg.data
    return load_jsonl(path, question_key=d.question_key, answer_key=d.answer_key or None,
                      solution_key=d.solution_key, id_key=d.id_key or None)


def make_engine(cfg: RunConfig, model) -> Engine:
    r = cfg.rollout
    return Engine(model, block_size=r.block_size, num_blocks=r.num_blocks or None, max_num_seqs=r.max_num_seqs)


def make_reward(cfg: RunConfig) -> BatchReward:
    r = cfg.reward
    return BatchReward(r.kind, timeout_s=r.timeout_s, workers=r.workers, memory_mb=r.memory_mb)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to optim.lr, then constant or cosine down to lr * min_lr_ratio."""
    o, total = cfg.optim, max(1, cfg.total_steps)
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_of(step: int, cfg: RunConfig) -> int:
    return 1 if step < cfg.score.stage1_steps else 2


def step_seed(run_seed: int, step: int) -> int:
    return (run_seed * 1_000_003 + step) % (2**62)


class DataOrder:
    """Problem indices of a step: a seeded permutation per epoch, a pure function of the step."""

    def __init__(self, n: int, per_step: int, seed: int, shuffle: bool):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.per_step, self.seed, self.shuffle = n, per_step, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            if self.shuffle:
                random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
            self._perms = {epoch: order}  # one epoch is enough to keep
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        out = []
        for g in range(step * self.per_step, (step + 1) * self.per_step):
            out.append(self._perm(g // self.n)[g % self.n])
        return out


# ---------------------------------------------------------------------------------------------------
# Packing and the loss of one micro-batch
# ---------------------------------------------------------------------------------------------------
def pack(trajectories: list[Trajectory], device: torch.device) -> dict:
    """Packed `[x, y1, p, y2]` sequences and the attempt-token rows of the loss.

    Hidden row t predicts token t + 1 of the same sequence; only rows whose target is an attempt
    token (label 1 or 2) are kept, in sequence order, with their own offsets (`cu_active`)."""
    ids, rows, targets, attempt, engine_logp, cu, cu_active, groups = [], [], [], [], [], [0], [0], []
    group_index: dict[int, int] = {}
    for t in trajectories:
        seq, labels = t.token_ids, t.attempt_labels
        offset = cu[-1]
        nan = float("nan")  # context tokens have no sampling log-prob
        logps = ([nan] * len(t.prompt_ids) + list(t.attempt1_logprobs) + [nan] * len(t.instruction_ids)
                 + list(t.attempt2_logprobs))
        for pos in range(1, len(seq)):
            if labels[pos]:
                rows.append(offset + pos - 1)
                targets.append(seq[pos])
                attempt.append(labels[pos])
                engine_logp.append(logps[pos])
        ids.extend(seq)
        cu.append(offset + len(seq))
        cu_active.append(len(rows))
        groups.append(group_index.setdefault(t.group, len(group_index)))
    as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)
    return {
        "input_ids": as_t(ids, torch.long), "cu_seqlens": as_t(cu, torch.int32),
        "max_seqlen": max(b - a for a, b in zip(cu[:-1], cu[1:])),
        "rows": as_t(rows, torch.long), "targets": as_t(targets, torch.long), "attempt": as_t(attempt, torch.int32),
        "engine_logp": as_t(engine_logp, torch.float32), "cu_active": as_t(cu_active, torch.int32),
        "group_ids": as_t(groups, torch.long),
        "r1": as_t([t.r1 for t in trajectories], torch.float32),
        "r2": as_t([t.r2 for t in trajectories], torch.float32),
    }


def attempt_logprobs(model, batch: dict, temperature: float, autocast, *, entropy: bool = False):
    """Log-probs (and entropies) of the attempt tokens under `model`: one packed forward."""
    with autocast():
        hidden = model.hidden_states(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"])
    hidden = hidden.index_select(0, batch["rows"])
    weight = model.lm_head_weight
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    return fused_linear_logprob(hidden, weight, batch["targets"], temperature=temperature, return_entropy=entropy)


def uses_star(cfg: RunConfig, stage: int) -> bool:
    """Whether this stage's update is STaR's filtered supervised training instead of REINFORCE."""
    return stage == 2 and cfg.score.stage2_update == "star"


def successful_attempt_rows(batch: dict) -> torch.Tensor:
    """Per attempt-token row of a packed batch: 1.0 when that row's attempt earned reward 1."""
    counts = (batch["cu_active"][1:] - batch["cu_active"][:-1]).long()
    trajectory = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    reward = torch.where(batch["attempt"] == 1, batch["r1"][trajectory], batch["r2"][trajectory])
    return (reward == 1.0).float()


def micro_batch_loss(policy, reference, batch: dict, cfg: RunConfig, stage: int, denominator: float,
                     autocast=contextlib.nullcontext):
    """(ScoreLossOutput, policy logp, entropy) of one packed micro-batch; the reference runs without grad.

    REINFORCE (score_loss) by default. Single-turn RL trains attempt 1 on r1 - beta1 KL1 (Stage II's
    attempt-1 return; there are no attempt-2 tokens). STaR in Stage II: the loss is the negative
    log-likelihood of the successful attempts' tokens over `denominator` (their count in the step);
    score_loss then only supplies the logged KL and returns."""
    s, temperature = cfg.score, cfg.rollout.temperature
    logp, entropy = attempt_logprobs(policy, batch, temperature, autocast, entropy=True)
    with torch.no_grad():
        ref_logp = attempt_logprobs(reference, batch, temperature, autocast)
    star = uses_star(cfg, stage)
    out = score_loss(logp.detach() if star else logp, ref_logp, batch["attempt"], batch["cu_active"],
                     batch["group_ids"], batch["r1"], batch["r2"], stage=2 if s.single_turn else stage,
                     alpha=0.0 if s.single_turn else s.alpha, beta1=s.beta1, beta2=s.beta2, kl_kind=s.kl_kind,
                     kl_placement=s.kl_placement, baseline=s.baseline, normalization=s.normalization,
                     loss_denominator=denominator)
    if star:
        out = dataclasses.replace(out, loss=-(logp * successful_attempt_rows(batch)).sum() / denominator)
    return out, logp, entropy


def micro_batches(trajectories: list[Trajectory], groups_per_micro_batch: int) -> list[list[Trajectory]]:
    """Consecutive whole groups (a prompt's k trajectories are never split)."""
    by_group: dict[int, list[Trajectory]] = {}
    for t in trajectories:
        by_group.setdefault(t.group, []).append(t)
    groups = list(by_group.values())
    return [sum(groups[i:i + groups_per_micro_batch], []) for i in range(0, len(groups), groups_per_micro_batch)]


def loss_denominator(trajectories: list[Trajectory], normalization: str, star: bool = False) -> float:
    """This rank's share of the step's loss normaliser: trajectories (sequence_mean) or attempt tokens
    (token_mean; with STaR only the trained tokens of attempts with reward 1)."""
    if star:
        return float(sum(sum(1 for lab in t.attempt_labels if lab and (t.r1, t.r2)[lab - 1] == 1.0)
                         for t in trajectories))
    if normalization == "sequence_mean":
        return float(len(trajectories))
    return float(sum(sum(1 for lab in t.attempt_labels if lab) for t in trajectories))


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------
class Trainer:
    """Owns the policy, the frozen reference, the engines and the optimizer of one run (of one rank
    when `env` is given: the process joined a torchrun job, see distributed.py)."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, env: D.DistEnv | None = None):
        if not cfg.model.path:
            raise ValueError("model.path is empty: point it at an HF-format model folder")
        if not cfg.data.train:
            raise ValueError("data.train is empty: point it at a JSONL file of training problems")
        if env is not None:
            D.shard_groups(cfg.optim.prompts_per_step, env)  # optim.prompts_per_step must split evenly
        self.cfg, self.env = cfg, env
        self.is_main = env is None or env.is_main
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(cfg.model.device) if env is None else env.device
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.tokenizer = load_tokenizer(cfg.model.path)
        if env is None:
            self.policy = from_pretrained(cfg.model.path, dtype=getattr(torch, cfg.model.dtype), device=self.device)
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        else:
            # Sharded runs keep fp32 master weights (an lr of 5e-6 is below bf16's resolution) and
            # compute in model.dtype, or in bf16 on GPU when autocast_bf16 is on.
            bf16 = cfg.model.dtype == "bfloat16" or (self.device.type == "cuda" and cfg.model.autocast_bf16)
            self.policy, self.reference = D.sharded_from_pretrained(
                cfg.model.path, env, compute_dtype=torch.bfloat16 if bf16 else torch.float32,
                reference_cpu_offload=cfg.model.reference_cpu_offload)
        self.policy.set_activation_checkpointing(cfg.model.activation_checkpointing)
        self.reference.set_activation_checkpointing(False)
        self.builder = prompt_builder(cfg, self.tokenizer)
        self.problems = load_problems(cfg, cfg.data.train)
        self.order = DataOrder(len(self.problems), cfg.optim.prompts_per_step, cfg.run.seed, cfg.data.shuffle)
        self.reward = make_reward(cfg)
        self.engine = self.base_engine = None  # built at the first rollout (sharded: on gathered weights)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.step = 0
        if resume:
            self.step = self._resume()
        metrics_file = self.out_dir / "metrics.jsonl"
        if not resume and metrics_file.exists() and metrics_file.stat().st_size:
            raise FileExistsError(f"{self.out_dir} already holds a run (metrics.jsonl); use --resume or a new --out")
        if env is not None:
            D.barrier(env)  # every rank has checked metrics.jsonl before rank 0 opens it
        self.logger = MetricsLogger(self.out_dir, tensorboard=cfg.run.tensorboard,
                                    resume_step=self.step if resume else None) if self.is_main else None

    def _resume(self) -> int:
        """Load the newest checkpoint; returns its step. A plain run resumes from either format
        (a sharded checkpoint loads into the plain model); a sharded run needs a sharded one."""
        plain, sharded = latest_checkpoint(self.out_dir), latest_sharded(self.out_dir)
        if self.env is None and plain is not None:
            return int(load_checkpoint(plain, self.policy, self.optimizer)["step"])
        if sharded is not None:
            return int(load_sharded(sharded, self.policy, self.optimizer)["step"])
        if plain is not None:
            raise ValueError(f"--resume: {plain} was written by a single-process run; resume it without "
                             "torchrun/--nproc (multi-process runs resume from their sharded checkpoints)")
        raise FileNotFoundError(f"--resume: no checkpoint under {self.out_dir / 'checkpoints'}")

    def autocast(self):
        if self.env is None and self.device.type == "cuda" and self.cfg.model.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # sharded: FSDP's mixed-precision policy casts the weights

    @contextlib.contextmanager
    def generation(self, base: bool = False):
        """The policy's engine (and the reference's, when `base`) on generation-ready weights:
        sharded runs all-gather them for the block (distributed.unsharded) and reshard after."""
        with contextlib.ExitStack() as stack:
            if self.env is not None:
                stack.enter_context(D.unsharded(self.policy))
                if base:
                    stack.enter_context(D.unsharded(self.reference))
            if self.engine is None:  # built on gathered weights: the engine takes their dtype
                self.engine = make_engine(self.cfg, self.policy)
            if base and self.base_engine is None:
                self.base_engine = make_engine(self.cfg, self.reference)
            yield self.engine

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        stage = stage_of(step, cfg)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        indices = self.order.indices(step)
        mine = D.shard_groups(len(indices), self.env)  # this rank's contiguous share (all: one process)
        problems = [self.problems[indices[g]] for g in mine]
        seed = step_seed(cfg.run.seed, step)
        s = cfg.score
        mix = 1.0 if not s.online_first_attempt else s.base_first_attempt_mix if stage == 2 else 0.0
        mix_rng = random.Random(f"{cfg.run.seed}/mix/{step}")
        from_base = [mix_rng.random() < mix for _ in indices][mine.start:mine.stop] if mix > 0 else None
        r = cfg.rollout
        with self.generation(base=mix > 0) as engine:
            trajectories, rollout = two_attempt_rollout(
                engine, self.builder, problems, self.reward, k=r.samples_per_prompt, temperature=r.temperature,
                top_p=r.top_p, top_k=r.top_k, max_tokens1=r.max_tokens_attempt1, max_tokens2=r.max_tokens_attempt2,
                seed=seed, base_engine=self.base_engine, from_base=from_base, first=mine.start,
                second_attempt=not s.single_turn)

        t0 = time.perf_counter()
        (denominator,) = D.all_reduce_sum([loss_denominator(trajectories, s.normalization, uses_star(cfg, stage))],
                                          self.env)
        denominator = max(denominator, 1.0)  # a STaR step with no successful attempt trains nothing
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, kls, rets, tokens, entropy_sum, gap_sum, n_active = 0.0, [], [], 0, 0.0, 0.0, 0
        for chunk in micro_batches(trajectories, cfg.optim.prompts_per_micro_batch):
            batch = pack(chunk, self.device)
            out, logp, entropy = micro_batch_loss(self.policy, self.reference, batch, cfg, stage, denominator,
                                                  self.autocast)
            out.loss.backward()
            loss_total += float(out.loss.detach())
            kls.append(out.kl.detach().float().cpu())
            rets.append(out.returns.detach().float().cpu())
            tokens += int(batch["input_ids"].numel())
            entropy_sum += float(entropy.detach().float().sum())
            gap_sum += float((logp.detach().float() - batch["engine_logp"]).abs().sum())
            n_active += int(logp.numel())
        if self.env is not None:
            D.reshard(self.reference)  # its root stays gathered after a forward; free it until the next step

        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = D.clip_grad_norm(self.policy, clip)  # the same float on every rank
        loss_total, tokens, entropy_sum, gap_sum, n_active = D.all_reduce_sum(
            [loss_total, tokens, entropy_sum, gap_sum, n_active], self.env)
        skipped = not (math.isfinite(loss_total) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)  # a NaN/Inf never reaches the weights
        else:
            self.optimizer.step()
        self.engine.clear_cache()
        train_seconds = time.perf_counter() - t0
        self.step += 1
        kl, returns = torch.cat(kls), torch.cat(rets)
        if self.env is not None:  # every rank's trajectories, in whole-batch order
            trajectories = D.gather_lists(trajectories, self.env)
            kl = torch.tensor(D.gather_lists(kl.tolist(), self.env))
            returns = torch.tensor(D.gather_lists(returns.tolist(), self.env))
            rollout.seconds, rollout.reward_seconds = D.all_reduce_max([rollout.seconds, rollout.reward_seconds],
                                                                       self.env)
            rollout.generated_tokens = int(D.all_reduce_sum([rollout.generated_tokens], self.env)[0])
            (train_seconds,) = D.all_reduce_max([train_seconds], self.env)
        return self._metrics(trajectories, rollout, stage, lr, loss_total, grad_norm, skipped, kl, returns,
                             int(tokens), train_seconds, entropy_sum / max(1, n_active), gap_sum / max(1, n_active))

    def _metrics(self, trajectories, rollout, stage, lr, loss, grad_norm, skipped, kl, returns, tokens,
                 train_seconds, entropy, logp_gap) -> dict:
        r1 = [t.r1 for t in trajectories]
        r2 = [t.r2 for t in trajectories]
        binary = all(v in (0.0, 1.0) for v in r1 + r2)
        m = {"stage": stage, "lr": lr, "loss": loss, "grad_norm": grad_norm, "skipped": int(skipped),
             "reward_1": sum(r1) / len(r1), "reward_2": sum(r2) / len(r2),
             "kl_1": float(kl[:, 0].mean()), "kl_2": float(kl[:, 1].mean()),
             "return_1": float(returns[:, 0].mean()), "return_2": float(returns[:, 1].mean()),
             "entropy": entropy, "logp_gap": logp_gap,
             "len_1": sum(len(t.attempt1_ids) for t in trajectories) / len(trajectories),
             "len_2": sum(len(t.attempt2_ids) for t in trajectories) / len(trajectories),
             "truncated_frac": sum((t.finish1 == "length") + (t.finish2 == "length") for t in trajectories)
             / (2 * len(trajectories)),
             "rollout_tokens_per_s": rollout.tokens_per_s, "rollout_s": rollout.seconds,
             "reward_s": rollout.reward_seconds, "train_s": train_seconds,
             "train_tokens_per_s": tokens / train_seconds if train_seconds > 0 else 0.0}
        if binary:
            batch = two_attempt_metrics(r1, r2, answers1=[extract_final_answer(t.text1) for t in trajectories],
                                        answers2=[extract_final_answer(t.text2) for t in trajectories])
            m.update({"acc_t1": batch["acc_t1"], "acc_t2": batch["acc_t2"], "delta": batch["delta"],
                      "delta_i2c": batch["delta_i2c"], "delta_c2i": batch["delta_c2i"],
                      "changed_frac": batch["changed_frac"]})
        if self.cfg.score.single_turn:  # no attempt 2 was sampled: nothing to report about it
            for key in ("reward_2", "kl_2", "return_2", "len_2", "acc_t2", "delta", "delta_i2c", "delta_c2i",
                        "changed_frac"):
                m.pop(key, None)
            m["truncated_frac"] = sum(t.finish1 == "length" for t in trajectories) / len(trajectories)
        if skipped:
            m["skip_reason"] = "non-finite loss" if not math.isfinite(loss) else "non-finite gradient"
        return m

    # -- the run -----------------------------------------------------------------------------------
    def save(self) -> Path:
        """A checkpoint of the current step (every rank calls it in a sharded run)."""
        state = {"stage": stage_of(max(0, self.step - 1), self.cfg), "data_step": self.step}
        if self.env is not None:
            return save_sharded(self.out_dir, self.step, self.policy, self.optimizer, state,
                                keep_last=self.cfg.run.keep_last)
        return save_checkpoint(self.out_dir, self.step, self.policy, self.optimizer, state,
                               keep_last=self.cfg.run.keep_last, tokenizer=self.tokenizer)

    def fit(self, max_steps: int | None = None) -> Path:
        """Train to the end of Stage II (or `max_steps` steps in all); returns the final model folder."""
        cfg = self.cfg
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        bar = None
        if cfg.run.progress and end > self.step and self.is_main:
            from tqdm import tqdm
            bar = tqdm(total=end, initial=self.step, desc="SCoRe", unit="step", dynamic_ncols=True)
        try:
            while self.step < end:
                metrics = self.train_step()
                if self.logger is not None:
                    self.logger.log(self.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(stage=metrics["stage"], r1=f"{metrics['reward_1']:.2f}",
                                    r2=f"{metrics.get('reward_2', float('nan')):.2f}", kl1=f"{metrics['kl_1']:.3f}")
                every = cfg.run.checkpoint_every
                if every and self.step % every == 0 and self.step < end:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.save()
        final = self.out_dir / "final"
        if self.env is not None:
            export_consolidated(self.policy, final)  # a collective; rank 0 writes
        else:
            save_pretrained(self.policy, final)
        if self.is_main:
            self.tokenizer.save_pretrained(final)
        return final

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.reward.close()


def train(cfg: RunConfig, out_dir: str | Path, *, max_steps: int | None = None, resume: bool = False) -> Path:
    """`score train`: the whole run, then plots and (when data.eval is set) the greedy evaluation.

    Under torchrun every rank trains; after the process group is closed, rank 0 alone plots and
    evaluates the exported `final/` policy while the other ranks exit."""
    env = D.init_distributed(cfg.model.device) if D.launched_by_torchrun() else None
    trainer = Trainer(cfg, out_dir, resume=resume, env=env)
    try:
        final = trainer.fit(max_steps)
        if env is None:
            with trainer.generation() as engine:
                finish_run(cfg, trainer.out_dir, engine, trainer.builder, trainer.reward)
    finally:
        trainer.close()
    # Reached only without an error. After one there is no closing barrier (a peer may be waiting
    # in another collective and never reach it): the process exits and the launcher stops the job.
    if env is not None:
        D.shutdown()
    if env is not None and env.is_main:
        model = from_pretrained(final, dtype=getattr(torch, cfg.model.dtype), device=env.device)
        reward = make_reward(cfg)
        try:
            finish_run(cfg, Path(out_dir), make_engine(cfg, model), prompt_builder(cfg, load_tokenizer(final)), reward)
        finally:
            reward.close()
    return final


def finish_run(cfg: RunConfig, out_dir: Path, engine: Engine, builder: PromptBuilder, reward) -> None:
    """Plots of metrics.jsonl and, when data.eval is set, the greedy two-attempt evaluation."""
    if cfg.run.plots:
        from .plots import plot_run

        plot_run(out_dir / "metrics.jsonl", out_dir / "plots")
    if cfg.data.eval:
        from .evaluate import evaluate, table, write_json, write_records

        problems = load_problems(cfg, cfg.data.eval)
        if cfg.run.eval_max_problems:
            problems = problems[:cfg.run.eval_max_problems]
        metrics, records = evaluate(engine, builder, problems, reward,
                                    budgets=cfg.eval_budgets, progress=cfg.run.progress)
        write_records(out_dir / "eval.jsonl", records)
        write_json(out_dir / "eval_metrics.json", metrics)
        print(table({"SCoRe": metrics}))
