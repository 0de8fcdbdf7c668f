"""Hand-made trajectories for loss and packing tests."""

from score.rl.data import Problem
from score.rl.rollout import Attempt, Trajectory


def trajectory(group, attempts, rewards, *, prompt=(1, 2), instruction=(3,), texts=None, base=False, problem=None):
    """A trajectory of `attempts` (token ids) with `rewards`: `instruction` before every attempt after
    the first, sampler log-probs -1, finish "stop"; `base`: attempt 1 came from the base model."""
    texts = texts or [""] * len(attempts)
    tries = [
        Attempt(list(instruction) if n else [], list(ids), [-1.0] * len(ids), "stop", text, float(reward))
        for n, (ids, reward, text) in enumerate(zip(attempts, rewards, texts, strict=True))
    ]
    return Trajectory(group, problem or Problem("p", "q", "1"), list(prompt), tries, first_from_base=base)
