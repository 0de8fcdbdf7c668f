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

More than two attempts (`score.attempts`, `attempt_terms`): Stage I has a part per attempt after the
first, and each attempt's return is computed by its own `score_loss` call (multi_attempt_loss); two
attempts take the single call above.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from score.kernels import ScoreLossOutput, fused_linear_logprob, score_loss
from score.model.model import linear_output_dtype

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
    rewards: torch.Tensor  # [S, A] reward of every attempt (A = attempts per trajectory)


def pack(trajectories: list[Trajectory], device: torch.device) -> PackedBatch:
    """One PackedBatch of `trajectories` (whole groups, in order) on `device`."""
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
        r1=as_t([t.r1 for t in trajectories], torch.float32),
        r2=as_t([t.r2 for t in trajectories], torch.float32),
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
    reward = torch.where(batch.attempt == 1, batch.r1[trajectory], batch.r2[trajectory])
    return (reward == 1.0).float()


@dataclasses.dataclass(frozen=True)
class AttemptTerm:
    """One attempt's return with more than two attempts: weight * r_a + bonus * (r_a - r_{a-1})
    - beta * KL_a, the KL against the anchor model (`anchored`) or the frozen base reference."""

    attempt: int
    weight: float
    bonus: float
    beta: float
    anchored: bool


def attempt_terms(stage: int, part: int, attempts: int, alpha: float, beta1: float, beta2: float) -> list[AttemptTerm]:
    """The returns of every attempt of a step ([ICLR] App. A.1): Stage I part j trains attempt j + 1
    on its reward (KL beta1 to the base model) with attempts 1..j held at the anchor (the model that
    ended part j - 1; the base model for j = 1) by beta2; Stage II trains every attempt on its reward,
    attempts after the first with the progress bonus alpha (r_a - r_{a-1}). Two attempts reproduce
    stage_coefficients' table."""
    if stage == 1:
        if attempts != part + 1:
            raise ValueError(f"Stage I part {part} trains attempt {part + 1}; got {attempts} attempts")
        held = [AttemptTerm(a, 0.0, 0.0, beta2, True) for a in range(1, part + 1)]
        return held + [AttemptTerm(part + 1, 1.0, 0.0, beta1, False)]
    return [AttemptTerm(1, 1.0, 0.0, beta1, False)] + [
        AttemptTerm(a, 1.0, alpha, beta1, False) for a in range(2, attempts + 1)
    ]


def multi_attempt_loss(logp, ref_logp, anchor_logp, batch: PackedBatch, cfg: RunConfig, terms, denominator: float):
    """The loss of `terms` over a packed batch: one `score_loss` call per attempt, that attempt's
    tokens in the kernel's attempt-2 slot (return r2 + bonus (r2 - r1) - beta KL with r2 = weight r_a,
    r1 = r_{a-1}), every call over the step's whole token denominator, so their sum is the step's
    token mean. Returns a ScoreLossOutput with [S, A] returns, advantages and KL."""
    s = cfg.score
    rewards = batch.rewards
    zeros = torch.zeros_like(rewards[:, 0])
    loss, returns, advantages, kls = 0.0, [], [], []
    for term in terms:
        a = term.attempt
        out = score_loss(
            logp,
            anchor_logp if term.anchored else ref_logp,
            torch.where(batch.attempt == a, 2, 0).to(torch.int32),
            batch.cu_active,
            batch.group_ids,
            rewards[:, a - 2] if a > 1 else zeros,
            term.weight * rewards[:, a - 1],
            r1_weight=0.0,
            progress_bonus=term.bonus,
            beta_attempt1=0.0,
            beta_attempt2=term.beta,
            kl_kind=s.kl_kind,
            kl_placement=s.kl_placement,
            baseline=s.baseline,
            normalization="token_mean",
            loss_denominator=denominator,
        )
        loss = loss + out.loss
        returns.append(out.returns[:, 1])
        advantages.append(out.advantages[:, 1])
        kls.append(out.kl[:, 1])
    stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
    return ScoreLossOutput(loss=loss, returns=stack(returns), advantages=stack(advantages), kl=stack(kls), stats={})


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
    """(ScoreLossOutput, policy logp, entropy) of one packed micro-batch; the reference runs without grad.

    REINFORCE (score_loss) by default. Single-turn RL trains attempt 1 on r1 - beta1 KL1 (Stage II's
    attempt-1 return; there are no attempt-2 tokens). STaR in Stage II: the loss is the negative
    log-likelihood of the successful attempts' tokens over `denominator` (their count in the step);
    score_loss then only supplies the logged KL and returns."""
    s, temperature = cfg.score, cfg.rollout.temperature
    logp, entropy = attempt_logprobs(policy, batch, temperature, autocast, entropy=True)
    with torch.no_grad():
        ref_logp = attempt_logprobs(reference, batch, temperature, autocast)
    attempts = batch.rewards.shape[1]
    if attempts > 2 or part > 1:
        if part > 1 and anchor is None:
            raise ValueError(f"Stage I part {part} holds attempts 1..{part - 1} at an anchor model; none was given")
        with torch.no_grad():
            anchor_logp = ref_logp if anchor is None else attempt_logprobs(anchor, batch, temperature, autocast)
        terms = attempt_terms(stage, part, attempts, s.alpha, s.beta1, s.beta2)
        return multi_attempt_loss(logp, ref_logp, anchor_logp, batch, cfg, terms, denominator), logp, entropy
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
