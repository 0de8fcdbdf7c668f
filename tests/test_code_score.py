"""Code SCoRe end to end on a tiny random model: MBPP-format training data, sandboxed code rewards,
Stage I + Stage II through `score train`, `score eval`, and the bundled HumanEval problems loaded for eval.

A random model writes no passing program, so rewards are 0; what is checked is the wiring: the
code reward kind, the code correction instruction, MBPP/HumanEval loading and the sandbox in the
trainer's reward path. That rewards are real verdicts (not a constant) is checked by grading a
correct and a broken program through the same `BatchReward` the trainer uses.
"""

import json

from score.rl.cli import main
from score.rl.config import to_toml
from score.rl.data import Problem
from score.rl.factories import load_problems
from score.rl.rewards import BatchReward
from tests.helpers.tiny_run import tiny_config

MBPP = [
    {
        "task_id": 1,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
    },
    {
        "task_id": 2,
        "text": "Write a function to reverse a string.",
        "code": "def rev(s):\n    return s[::-1]",
        "test_list": ["assert rev('ab') == 'ba'"],
    },
]


def test_code_rewards_in_the_trainer_path_are_real_verdicts(closes):
    reward = closes(BatchReward("code", timeout_s=5.0, workers=1, memory_mb=512))
    problem = Problem(id="1", question=MBPP[0]["text"], answer="", meta={"code": MBPP[0]})
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    assert reward([good, bad], [problem, problem]) == [1.0, 0.0]


def test_code_score_trains_and_evaluates_end_to_end(tmp_path):
    train = tmp_path / "mbpp.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in MBPP))
    cfg = tiny_config(
        tmp_path,
        reward__kind="code",
        data__train=str(train),
        prompt__correction_instruction="default",
        score__beta2=0.25,
    )
    config = tmp_path / "code.toml"
    config.write_text(to_toml(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(steps) == 4 and {s["stage"] for s in steps} == {1, 2}
    assert (out / "final" / "config.json").exists()

    # The tiny model's 256 positions cannot hold a HumanEval prompt under its digit-trained tokenizer,
    # so `score eval` runs on the MBPP file; HumanEval loading through the trainer is checked below.
    ev = tmp_path / "eval"
    assert (
        main(["eval", "--model", str(out / "final"), "--data", str(train), "--out", str(ev), "--config", str(config)])
        == 0
    )
    records = [json.loads(line) for line in open(ev / "eval.jsonl")]
    assert [r["id"] for r in records] == ["1", "2"]
    assert all(r["r1"] in (0.0, 1.0) and r["r2"] in (0.0, 1.0) for r in records)
    humaneval = load_problems(cfg, "humaneval")
    assert len(humaneval) == 164 and humaneval[0].id == "HumanEval/0"
    assert humaneval[0].question == humaneval[0].meta["code"]["prompt"]
