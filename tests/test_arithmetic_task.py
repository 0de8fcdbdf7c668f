"""The built-in arithmetic task, its integer reward and the bootstrap standard error of the table."""

from __future__ import annotations

import math

import pytest

from score.rl import arithmetic_task
from score.rl.config import config_from_dict
from score.rl.factories import load_problems, prompt_builder
from score.rl.metrics import bootstrap_stderr
from score.rl.prompts import INTEGER_CORRECTION_INSTRUCTION, INTEGER_SYSTEM_PROMPT
from score.rl.rewards import BatchReward
from score.rl.rewards.integer_reward import extract_integer, integer_reward


def test_problems_are_reproducible_distinct_and_splits_disjoint():
    train = arithmetic_task.problems(800, "train")
    held_out = arithmetic_task.problems(200, "eval")
    assert train == arithmetic_task.problems(800, "train")
    assert len({p.question for p in train}) == 800
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert all(arithmetic_task.split_of(p.question) == "eval" for p in held_out)
    assert all(int(p.answer) >= 0 for p in train + held_out)
    with pytest.raises(ValueError, match="split must be one of"):
        arithmetic_task.problems(3, "test")


@pytest.mark.parametrize("template", arithmetic_task._TEMPLATES)
def test_every_template_states_a_problem_whose_answer_it_computes(template):
    import random
    import re

    rng = random.Random(0)
    for _ in range(200):
        question, answer = template(rng)
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        if "gives away" in question:
            assert answer == numbers[0] - numbers[1]
        elif "boxes" in question:
            assert answer == numbers[0] * numbers[1]
        elif "uses" in question:
            assert answer == numbers[0] + numbers[1] - numbers[2]
        else:
            assert answer == numbers[0] + numbers[1]
        assert answer >= 0


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("The final answer is 82.", 82),
        ("He has 12 + 30 = 42 apples.\nThe final answer is $42$. I hope it is correct.", 42),
        ("37 + 45 = 82", 82),
        ("so the answer is 1,234 apples, not 12", 1234),
        ("Answer: 56. Check: 50 + 6", 56),
        ("\\boxed{-7} was my guess; 3 more", -7),
        ("x = 12.0", 12),
        ("We get 12.5", None),
        ("no numbers here", None),
        ("The final answer is N. Then 19", 19),  # the marker holds no number: fall back
    ],
)
def test_extract_integer(text, value):
    assert extract_integer(text) == value


def test_integer_reward_and_batch_reward_kind():
    assert integer_reward("The final answer is 42.", "42") == 1.0
    assert integer_reward("The final answer is 41.", "42") == 0.0
    reward = BatchReward("integer")
    problems = arithmetic_task.problems(2, "eval")
    texts = [f"The final answer is {problems[0].answer}.", "I do not know."]
    assert reward(texts, problems) == [1.0, 0.0]
    assert reward.answer_of(texts[0]) == problems[0].answer and reward.answer_of(texts[1]) is None


def test_builtin_source_and_default_prompts_of_the_integer_kind():
    cfg = config_from_dict({"reward": {"kind": "integer"}, "data": {"train": "builtin:arithmetic/train"}})
    assert len(load_problems(cfg, "builtin:arithmetic/eval")) == arithmetic_task.SPLIT_SIZE["eval"]
    with pytest.raises(ValueError, match="split must be one of"):
        load_problems(cfg, "builtin:arithmetic/test")
    with pytest.raises(ValueError, match="unknown data source 'builtin:sums/train'"):
        load_problems(cfg, "builtin:sums/train")

    class Plain:  # prompt_builder only needs encode for plain-text prompts
        bos_token_id = None

        def encode(self, text):
            return [ord(c) for c in text]

    cfg.prompt.chat = False
    builder = prompt_builder(cfg, Plain())
    assert builder.system_prompt == INTEGER_SYSTEM_PROMPT
    assert builder.correction_instruction == INTEGER_CORRECTION_INSTRUCTION


def test_bootstrap_stderr_matches_the_binomial_standard_error():
    n = 400
    r1 = [1.0] * 120 + [0.0] * 280
    r2 = [1.0] * 100 + [0.0] * 20 + [1.0] * 60 + [0.0] * 220  # 60 i->c, 20 c->i
    se = bootstrap_stderr(r1, r2, resamples=4000, seed=1)
    p1 = 0.3
    assert se["acc_t1"] == pytest.approx(math.sqrt(p1 * (1 - p1) / n), rel=0.1)
    # Δ = i2c - c2i per problem takes values +1, -1, 0: its variance is (p+ + p-) - (p+ - p-)^2.
    plus, minus = 60 / n, 20 / n
    assert se["delta"] == pytest.approx(math.sqrt((plus + minus - (plus - minus) ** 2) / n), rel=0.1)
    assert bootstrap_stderr(r1, r2, resamples=50, seed=3) == bootstrap_stderr(r1, r2, resamples=50, seed=3)
    with pytest.raises(ValueError, match="equally many"):
        bootstrap_stderr([1.0], [])
