"""The SCoRe loss of a step: trajectories packed into `[x, y1, p, y2, ...]` rows, their attempt-token
log-probs under the policy and its KL references, and the returns table of the stages.

Returns per attempt (KL_i = sequence KL of attempt i; the kernel applies the RLOO baseline and the
token-mean normalisation). Two attempts:

| stage | attempt 1             | attempt 2                              |
|-------|-----------------------|----------------------------------------|
| I     | -beta2 KL1            | r2 - beta1 KL2                         |
| II    | r1 - beta1 KL1        | r2 + alpha (r2 - r1) - beta1 KL2       |

Stage I anchors attempt 1 to the base model while attempt 2 learns to fix it; Stage II trains both
attempts and rewards progress (a wrong-to-right change earns alpha more than staying right).

More than two attempts (`score.attempts`, [ICLR] App. A.1): Stage I part j trains attempt j + 1 on
r_{j+1} - beta1 KL (to the base model) with attempts 1..j held by beta2 KL to the anchor (the model
that ended part j - 1; the base model for j = 1); Stage II trains every attempt on its reward, the
attempts after the first with the progress bonus alpha (r_a - r_{a-1}). Every case is one
`score_loss` call with per-attempt coefficients and a per-token KL reference.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from score.kernels import fused_linear_logprob, score_loss
from score.model.model import linear_output_dtype

from .config import RunConfig
from .rollout import Trajectory


@dataclasses.dataclass(frozen=True)
class AttemptCoefficients:
    """The returns of a step's attempts as `score_loss` coefficients (one entry per attempt), and
    which attempts take their KL against the anchor model instead of the frozen base model."""

    reward_weight: list[float]
    progress_bonus: list[float]
    beta: list[float]
    anchored: list[bool]

    def kernel_arguments(self) -> dict:
        return {"reward_weight": self.reward_weight, "progress_bonus": self.progress_bonus, "beta": self.beta}


def attempt_coefficients(
    stage: int, part: int, attempts: int, alpha: float, beta1: float, beta2: float
) -> AttemptCoefficients:
    """The returns table above for a step of `stage` (Stage I part `part`) with `attempts` attempts."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if stage == 1:
        if attempts != part + 1:
            raise ValueError(f"Stage I part {part} trains attempt {part + 1}; got {attempts} attempts")
        held = [True] * part + [False]
        return AttemptCoefficients(
            reward_weight=[0.0 if h else 1.0 for h in held],
            progress_bonus=[0.0] * attempts,
            beta=[float(beta2) if h else float(beta1) for h in held],
            anchored=held,
        )
    return AttemptCoefficients(
        reward_weight=[1.0] * attempts,
        progress_bonus=[0.0] + [float(alpha)] * (attempts - 1),
        beta=[float(beta1)] * attempts,
        anchored=[False] * attempts,
    )


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
    attempt: torch.Tensor  # [N] int32 attempt number (1, 2, ...) of each target
    engine_logp: torch.Tensor  # [N] the sampler's log-probs of the targets
    cu_active: torch.Tensor  # [S + 1] int32 offsets of each trajectory's rows
    group_ids: torch.Tensor  # [S] int64 prompt group of each trajectory
    rewards: torch.Tensor  # [S, A] reward of every attempt (A = attempts per trajectory)


def pack(trajectories: list[Trajectory], device: torch.device) -> PackedBatch:
    """One PackedBatch of `trajectories` (whole groups, in order, the same number of attempts each) on `device`."""
    counts = {len(t.attempts) for t in trajectories}
    if len(counts) != 1:
        raise ValueError(f"pack needs trajectories with the same number of attempts, got {sorted(counts)}")
    ids, rows, targets, attempt, engine_logp, cu, cu_active, groups = [], [], [], [], [], [0], [0], []
    group_index: dict[int, int] = {}
    for t in trajectories:
        seq, labels, logps = t.token_ids, t.attempt_labels, t.sampler_logprobs
        offset = cu[-1]
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
        rewards=as_t([t.rewards for t in trajectories], torch.float32),
    )


def attempt_logprobs(model, batch: PackedBatch, temperature: float, autocast, *, entropy: bool = False):
    """Log-probs (and entropies) of the attempt tokens under `model`: one packed forward."""
    with autocast():
        hidden = model.hidden_states(batch.input_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        head_dtype = linear_output_dtype(hidden)  # what autocast's LM head would compute in
    hidden = hidden.index_select(0, batch.rows).to(head_dtype)
    weight = model.lm_head_weight
    if weight.dtype != hidden.dtype and weight.dtype != torch.float32:  # fp32 masters go in as they are
        weight = weight.to(hidden.dtype)
    return fused_linear_logprob(hidden, weight, batch.targets, temperature=temperature, return_entropy=entropy)


def uses_star(cfg: RunConfig, stage: int) -> bool:
    """Whether this stage's update is STaR's filtered supervised training instead of REINFORCE."""
    return stage == 2 and cfg.score.stage2_update == "star"


def successful_attempt_rows(batch: PackedBatch) -> torch.Tensor:
    """Per attempt-token row of a packed batch: 1.0 when that row's attempt earned reward 1."""
    counts = (batch.cu_active[1:] - batch.cu_active[:-1]).long()
    trajectory = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    reward = batch.rewards[trajectory, batch.attempt.long() - 1]
    return (reward == 1.0).float()


def micro_batch_loss(
    policy,
    reference,
    batch: PackedBatch,
    cfg: RunConfig,
    stage: int,
    denominator: float,
    autocast=contextlib.nullcontext,
    *,
    part: int = 1,
    anchor=None,
):
    """(ScoreLossOutput, policy logp, entropy) of one packed micro-batch; the references run without grad.

    REINFORCE (score_loss) by default, with the coefficients of `attempt_coefficients`; the attempts
    held at the anchor (Stage I parts after the first) take their KL against `anchor`, the others
    against `reference`. Single-turn RL trains attempt 1 alone on r1 - beta1 KL1. STaR in Stage II:
    the loss is the negative log-likelihood of the successful attempts' tokens over `denominator`
    (their count in the step); score_loss then only supplies the logged KL and returns."""
    s, temperature = cfg.score, cfg.rollout.temperature
    if part > 1 and anchor is None:
        raise ValueError(f"Stage I part {part} holds attempts 1..{part} at an anchor model; none was given")
    logp, entropy = attempt_logprobs(policy, batch, temperature, autocast, entropy=True)
    coefficients = attempt_coefficients(
        2 if s.single_turn else stage, part, batch.rewards.shape[1], s.alpha, s.beta1, s.beta2
    )
    with torch.no_grad():
        kl_reference = attempt_logprobs(reference, batch, temperature, autocast)
        if part > 1 and any(coefficients.anchored):  # part 1's anchor is the base model itself
            anchored = torch.tensor(coefficients.anchored, device=batch.attempt.device)[batch.attempt.long() - 1]
            kl_reference = torch.where(anchored, attempt_logprobs(anchor, batch, temperature, autocast), kl_reference)
    star = uses_star(cfg, stage)
    out = score_loss(
        logp.detach() if star else logp,
        kl_reference,
        batch.attempt,
        batch.cu_active,
        batch.group_ids,
        batch.rewards,
        **coefficients.kernel_arguments(),
        kl_kind=s.kl_kind,
        kl_placement=s.kl_placement,
        baseline=s.baseline,
        normalization=s.normalization,
        loss_denominator=denominator,
    )
    if star:
        out = dataclasses.replace(out, loss=-(logp * successful_attempt_rows(batch)).sum() / denominator)
    return out, logp, entropy


def loss_denominator(trajectories: list[Trajectory], normalization: str, star: bool = False) -> float:
    """This rank's share of the step's loss normaliser: trajectories (sequence_mean) or attempt tokens
    (token_mean; with STaR only the trained tokens of attempts with reward 1)."""
    if star:
        return float(sum(sum(1 for lab in t.attempt_labels if lab and t.rewards[lab - 1] == 1.0) for t in trajectories))
    if normalization == "sequence_mean":
        return float(len(trajectories))
    return float(sum(sum(1 for lab in t.attempt_labels if lab) for t in trajectories))
