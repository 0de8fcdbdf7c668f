"""The SCoRe loss of a step: trajectories packed into `[x, y1, p, y2]` rows, their attempt-token
log-probs under the policy and the frozen reference, and the returns table of the two stages.

Returns per attempt (KL_i = sequence KL of attempt i; the kernel applies the RLOO baseline and the
token-mean normalisation):

| stage | attempt 1             | attempt 2                              |
|-------|-----------------------|----------------------------------------|
| I     | -beta2 KL1            | r2 - beta1 KL2                         |
| II    | r1 - beta1 KL1        | r2 + alpha (r2 - r1) - beta1 KL2       |

Stage I anchors attempt 1 to the base model while attempt 2 learns to fix it; Stage II trains both
attempts and rewards progress (a wrong-to-right change earns alpha more than staying right).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from score.kernels import fused_linear_logprob, score_loss

from .config import RunConfig
from .rollout import Trajectory


def stage_coefficients(stage: int, alpha: float, beta1: float, beta2: float) -> dict:
    """The returns table above as `score_loss` coefficients."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if stage == 1:
        return {"r1_weight": 0.0, "progress_bonus": 0.0, "beta_attempt1": float(beta2), "beta_attempt2": float(beta1)}
    return {
        "r1_weight": 1.0,
        "progress_bonus": float(alpha),
        "beta_attempt1": float(beta1),
        "beta_attempt2": float(beta1),
    }


@dataclasses.dataclass
class PackedBatch:
    """Trajectories back to back (`cu_seqlens`), and the rows of the loss: hidden row t predicts
    token t + 1 of its sequence; only rows whose target is an attempt token are kept, in sequence
    order, with their own offsets (`cu_active`)."""

    input_ids: torch.Tensor  # [T] every token of every trajectory
    cu_seqlens: torch.Tensor  # [S + 1] int32 sequence offsets into input_ids
    max_seqlen: int
    rows: torch.Tensor  # [N] hidden-state rows whose next token is an attempt token
    targets: torch.Tensor  # [N] those next tokens
    attempt: torch.Tensor  # [N] int32, 1 or 2
    engine_logp: torch.Tensor  # [N] the sampler's log-probs of the targets
    cu_active: torch.Tensor  # [S + 1] int32 offsets of each trajectory's rows
    group_ids: torch.Tensor  # [S] int64 prompt group of each trajectory
    r1: torch.Tensor  # [S] reward of attempt 1
    r2: torch.Tensor  # [S] reward of attempt 2


def pack(trajectories: list[Trajectory], device: torch.device) -> PackedBatch:
    """One PackedBatch of `trajectories` (whole groups, in order) on `device`."""
    ids, rows, targets, attempt, engine_logp, cu, cu_active, groups = [], [], [], [], [], [0], [0], []
    group_index: dict[int, int] = {}
    for t in trajectories:
        seq, labels = t.token_ids, t.attempt_labels
        offset = cu[-1]
        nan = float("nan")  # context tokens have no sampling log-prob
        logps = (
            [nan] * len(t.prompt_ids)
            + list(t.attempt1_logprobs)
            + [nan] * len(t.instruction_ids)
            + list(t.attempt2_logprobs)
        )
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

    def as_t(v, dt):
        return torch.tensor(v, dtype=dt, device=device)

    return PackedBatch(
        input_ids=as_t(ids, torch.long),
        cu_seqlens=as_t(cu, torch.int32),
        max_seqlen=max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True)),
        rows=as_t(rows, torch.long),
        targets=as_t(targets, torch.long),
        attempt=as_t(attempt, torch.int32),
        engine_logp=as_t(engine_logp, torch.float32),
        cu_active=as_t(cu_active, torch.int32),
        group_ids=as_t(groups, torch.long),
        r1=as_t([t.r1 for t in trajectories], torch.float32),
        r2=as_t([t.r2 for t in trajectories], torch.float32),
    )


def attempt_logprobs(model, batch: PackedBatch, temperature: float, autocast, *, entropy: bool = False):
    """Log-probs (and entropies) of the attempt tokens under `model`: one packed forward."""
    with autocast():
        hidden = model.hidden_states(batch.input_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    hidden = hidden.index_select(0, batch.rows)
    weight = model.lm_head_weight
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    return fused_linear_logprob(hidden, weight, batch.targets, temperature=temperature, return_entropy=entropy)


def uses_star(cfg: RunConfig, stage: int) -> bool:
    """Whether this stage's update is STaR's filtered supervised training instead of REINFORCE."""
    return stage == 2 and cfg.score.stage2_update == "star"


def successful_attempt_rows(batch: PackedBatch) -> torch.Tensor:
    """Per attempt-token row of a packed batch: 1.0 when that row's attempt earned reward 1."""
    counts = (batch.cu_active[1:] - batch.cu_active[:-1]).long()
    trajectory = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    reward = torch.where(batch.attempt == 1, batch.r1[trajectory], batch.r2[trajectory])
    return (reward == 1.0).float()


def micro_batch_loss(
    policy,
    reference,
    batch: PackedBatch,
    cfg: RunConfig,
    stage: int,
    denominator: float,
    autocast=contextlib.nullcontext,
):
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
    out = score_loss(
        logp.detach() if star else logp,
        ref_logp,
        batch.attempt,
        batch.cu_active,
        batch.group_ids,
        batch.r1,
        batch.r2,
        **stage_coefficients(2 if s.single_turn else stage, 0.0 if s.single_turn else s.alpha, s.beta1, s.beta2),
        kl_kind=s.kl_kind,
        kl_placement=s.kl_placement,
        baseline=s.baseline,
        normalization=s.normalization,
        loss_denominator=denominator,
    )
    if star:
        out = dataclasses.replace(out, loss=-(logp * successful_attempt_rows(batch)).sum() / denominator)
    return out, logp, entropy


def micro_batches(trajectories: list[Trajectory], groups_per_micro_batch: int) -> list[list[Trajectory]]:
    """Consecutive whole groups (a prompt's k trajectories are never split)."""
    by_group: dict[int, list[Trajectory]] = {}
    for t in trajectories:
        by_group.setdefault(t.group, []).append(t)
    groups = list(by_group.values())
    return [sum(groups[i : i + groups_per_micro_batch], []) for i in range(0, len(groups), groups_per_micro_batch)]


def loss_denominator(trajectories: list[Trajectory], normalization: str, star: bool = False) -> float:
    """This rank's share of the step's loss normaliser: trajectories (sequence_mean) or attempt tokens
    (token_mean; with STaR only the trained tokens of attempts with reward 1)."""
    if star:
        return float(
            sum(sum(1 for lab in t.attempt_labels if lab and (t.r1, t.r2)[lab - 1] == 1.0) for t in trajectories)
        )
    if normalization == "sequence_mean":
        return float(len(trajectories))
    return float(sum(sum(1 for lab in t.attempt_labels if lab) for t in trajectories))
