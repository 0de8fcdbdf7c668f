"""The embedded demo: the task and its checker, the shipped demo config, and the pipeline in quick mode."""
import json
import random
from pathlib import Path

import pytest

from score.rl import demo_task
from score.rl.config import load_config
from score.rl.demo import DEMO_RL, build_tokenizer, encode_warmup, run_demo
from score.rl.prompts import PromptBuilder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_task_answers_are_checked_not_assumed():
    p = demo_task.make_problem((17, 45, 32))
    assert p.answer == "94" and p.question == "17+45+32"
    assert demo_task.check_answer("7+5+2=14, 1+1+4+3=9. \\boxed{94}", p.answer) == 1.0
    assert demo_task.check_answer("\\boxed{95}", p.answer) == 0.0
    assert demo_task.check_answer("94", p.answer) == 0.0  # no final answer stated
    assert demo_task.worked_solution((17, 45, 32)) == "7+5+2=14, 1+1+4+3=9. \\boxed{94}"
    assert demo_task.worked_solution((99, 98, 97)) == "9+8+7=24, 2+9+9+9=29. \\boxed{294}"


def test_eval_split_is_disjoint_from_training():
    train = {p.id for p in demo_task.problems(500, "train", 0)}
    held_out = {p.id for p in demo_task.problems(300, "eval", 0)}
    assert len(held_out) == 300 and not train & held_out
    rng = random.Random(0)
    for _ in range(300):
        ex = demo_task.warmup_example(rng)
        operands = tuple(int(x) for x in ex.question.split("+"))
        if len(operands) == demo_task.OPERANDS and min(operands) >= demo_task.LOW:  # a task problem
            assert demo_task.split_of(operands) == "train"


def test_warmup_traces_are_token_in_token_out():
    tok = build_tokenizer(300, 0)
    builder = PromptBuilder(tok, chat=False, system_prompt=None,
                            correction_instruction=demo_task.CORRECTION_INSTRUCTION)
    ex = demo_task.WarmupExample("17+45+32", ("\\boxed{93}", "\\boxed{94}"), (False, True))
    ids, mask = encode_warmup(ex, builder, tok.eos_token_id)
    prompt = builder.first_attempt_ids("17+45+32")
    first = tok.encode("\\boxed{93}") + [tok.eos_token_id]
    context, _ = builder.second_attempt_ids(prompt, first, "stop")
    assert ids[:len(context)] == context and len(ids) == len(mask)
    assert sum(mask) == len(tok.encode("\\boxed{94}")) + 1  # only the second attempt (+ EOS) is trained


def test_shipped_demo_config_matches_the_demo():
    cfg = load_config(CONFIGS / "demo.toml")
    for section, values in DEMO_RL.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_quick_demo_writes_every_output(tmp_path, capsys):
    results = run_demo(tmp_path, quick=True, ablations=True, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    for row in ("base", "score", "no_stage1", "no_shaping"):
        for key in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "n"):
            assert key in saved[row]
        assert saved[row]["delta"] == pytest.approx(saved[row]["delta_i2c"] - saved[row]["delta_c2i"])
    assert saved["score"] == pytest.approx(results["score"])
    for name in ("eval_base.jsonl", "eval_score.jsonl"):
        rows = [json.loads(line) for line in open(tmp_path / name)]
        assert len(rows) == saved["base"]["n"]
        assert all({"id", "attempt1", "attempt2", "r1", "r2"} <= set(r) for r in rows)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "base" / f).exists()
    assert (tmp_path / "score" / "metrics.jsonl").exists()
    assert any((tmp_path / "plots").glob("*.png"))
    out = capsys.readouterr().out
    assert "Base model" in out and "SCoRe" in out and "no Stage I" in out and "no reward shaping" in out
