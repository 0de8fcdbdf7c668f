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
Not done: multi-GPU, PPO-style multiple epochs per batch, adaptive beta2.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from pathlib import Path

import torch

from score.kernels import fused_linear_logprob, score_loss
from score.model import Engine, from_pretrained, load_tokenizer, save_pretrained

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig
from .data import Problem, load_jsonl
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


def micro_batch_loss(policy, reference, batch: dict, cfg: RunConfig, stage: int, denominator: float,
                     autocast=contextlib.nullcontext):
    """(ScoreLossOutput, policy logp, entropy) of one packed micro-batch; the reference runs without grad."""
    s, temperature = cfg.score, cfg.rollout.temperature
    logp, entropy = attempt_logprobs(policy, batch, temperature, autocast, entropy=True)
    with torch.no_grad():
        ref_logp = attempt_logprobs(reference, batch, temperature, autocast)
    out = score_loss(logp, ref_logp, batch["attempt"], batch["cu_active"], batch["group_ids"], batch["r1"],
                     batch["r2"], stage=stage, alpha=s.alpha, beta1=s.beta1, beta2=s.beta2, kl_kind=s.kl_kind,
                     kl_placement=s.kl_placement, baseline=s.baseline, normalization=s.normalization,
                     loss_denominator=denominator)
    return out, logp, entropy


def micro_batches(trajectories: list[Trajectory], groups_per_micro_batch: int) -> list[list[Trajectory]]:
    """Consecutive whole groups (a prompt's k trajectories are never split)."""
    by_group: dict[int, list[Trajectory]] = {}
    for t in trajectories:
        by_group.setdefault(t.group, []).append(t)
    groups = list(by_group.values())
    return [sum(groups[i:i + groups_per_micro_batch], []) for i in range(0, len(groups), groups_per_micro_batch)]


def loss_denominator(trajectories: list[Trajectory], normalization: str) -> float:
    if normalization == "sequence_mean":
        return float(len(trajectories))
    return float(sum(sum(1 for lab in t.attempt_labels if lab) for t in trajectories))


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------
class Trainer:
    """Owns the policy, the frozen reference, the engine and the optimizer of one run."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False):
        if not cfg.model.path:
            raise ValueError("model.path is empty: point it at an HF-format model folder")
        if not cfg.data.train:
            raise ValueError("data.train is empty: point it at a JSONL file of training problems")
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(cfg.model.device)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        dtype = getattr(torch, cfg.model.dtype)
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.policy = from_pretrained(cfg.model.path, dtype=dtype, device=self.device)
        self.policy.set_activation_checkpointing(cfg.model.activation_checkpointing)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.reference.set_activation_checkpointing(False)
        self.builder = prompt_builder(cfg, self.tokenizer)
        self.problems = load_problems(cfg, cfg.data.train)
        self.order = DataOrder(len(self.problems), cfg.optim.prompts_per_step, cfg.run.seed, cfg.data.shuffle)
        self.reward = make_reward(cfg)
        r = cfg.rollout
        engine_kw = dict(block_size=r.block_size, num_blocks=r.num_blocks or None, max_num_seqs=r.max_num_seqs)
        self.engine = Engine(self.policy, **engine_kw)
        self.base_engine = Engine(self.reference, **engine_kw) if cfg.score.base_first_attempt_mix > 0 else None
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.step = 0
        if resume:
            last = latest_checkpoint(self.out_dir)
            if last is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.out_dir / 'checkpoints'}")
            state = load_checkpoint(last, self.policy, self.optimizer)
            self.step = int(state["step"])
        metrics_file = self.out_dir / "metrics.jsonl"
        if not resume and metrics_file.exists() and metrics_file.stat().st_size:
            raise FileExistsError(f"{self.out_dir} already holds a run (metrics.jsonl); use --resume or a new --out")
        self.logger = MetricsLogger(self.out_dir, tensorboard=cfg.run.tensorboard,
                                    resume_step=self.step if resume else None)

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.model.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        stage = stage_of(step, cfg)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        problems = [self.problems[i] for i in self.order.indices(step)]
        seed = step_seed(cfg.run.seed, step)
        mix = cfg.score.base_first_attempt_mix if stage == 2 else 0.0
        mix_rng = random.Random(f"{cfg.run.seed}/mix/{step}")
        from_base = [mix_rng.random() < mix for _ in problems] if mix > 0 else None
        r = cfg.rollout
        trajectories, rollout = two_attempt_rollout(
            self.engine, self.builder, problems, self.reward, k=r.samples_per_prompt, temperature=r.temperature,
            top_p=r.top_p, top_k=r.top_k, max_tokens1=r.max_tokens_attempt1, max_tokens2=r.max_tokens_attempt2,
            seed=seed, base_engine=self.base_engine, from_base=from_base)

        t0 = time.perf_counter()
        s = cfg.score
        denominator = loss_denominator(trajectories, s.normalization)
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

        params = [p for p in self.policy.parameters() if p.grad is not None]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else 0.0
        skipped = not (math.isfinite(loss_total) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)  # a NaN/Inf never reaches the weights
        else:
            self.optimizer.step()
        self.engine.clear_cache()
        train_seconds = time.perf_counter() - t0
        self.step += 1
        return self._metrics(trajectories, rollout, stage, lr, loss_total, grad_norm, skipped, torch.cat(kls),
                             torch.cat(rets), tokens, train_seconds, entropy_sum / max(1, n_active),
                             gap_sum / max(1, n_active))

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
        if skipped:
            m["skip_reason"] = "non-finite loss" if not math.isfinite(loss) else "non-finite gradient"
        return m

    # -- the run -----------------------------------------------------------------------------------
    def save(self) -> Path:
        return save_checkpoint(self.out_dir, self.step, self.policy, self.optimizer,
                               {"stage": stage_of(max(0, self.step - 1), self.cfg), "data_step": self.step},
                               keep_last=self.cfg.run.keep_last, tokenizer=self.tokenizer)

    def fit(self, max_steps: int | None = None) -> Path:
        """Train to the end of Stage II (or `max_steps` steps in all); returns the final model folder."""
        cfg = self.cfg
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        bar = None
        if cfg.run.progress and end > self.step:
            from tqdm import tqdm
            bar = tqdm(total=end, initial=self.step, desc="SCoRe", unit="step", dynamic_ncols=True)
        try:
            while self.step < end:
                metrics = self.train_step()
                self.logger.log(self.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(stage=metrics["stage"], r1=f"{metrics['reward_1']:.2f}",
                                    r2=f"{metrics['reward_2']:.2f}", kl1=f"{metrics['kl_1']:.3f}")
                every = cfg.run.checkpoint_every
                if every and self.step % every == 0 and self.step < end:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.save()
        final = self.out_dir / "final"
        save_pretrained(self.policy, final)
        self.tokenizer.save_pretrained(final)
        return final

    def close(self) -> None:
        self.logger.close()
        self.reward.close()


def train(cfg: RunConfig, out_dir: str | Path, *, max_steps: int | None = None, resume: bool = False) -> Path:
    """`score train`: the whole run, then plots and (when data.eval is set) the greedy evaluation."""
    trainer = Trainer(cfg, out_dir, resume=resume)
    try:
        final = trainer.fit(max_steps)
        if cfg.run.plots:
            from .plots import plot_run

            plot_run(trainer.out_dir / "metrics.jsonl", trainer.out_dir / "plots")
        if cfg.data.eval:
            from .evaluate import evaluate, table, write_json, write_records

            problems = load_problems(cfg, cfg.data.eval)
            if cfg.run.eval_max_problems:
                problems = problems[:cfg.run.eval_max_problems]
            metrics, records = evaluate(trainer.engine, trainer.builder, problems, trainer.reward,
                                        max_tokens=cfg.run.eval_max_tokens, progress=cfg.run.progress)
            write_records(trainer.out_dir / "eval.jsonl", records)
            write_json(trainer.out_dir / "eval_metrics.json", metrics)
            print(table({"SCoRe": metrics}))
        return final
    finally:
        trainer.close()
