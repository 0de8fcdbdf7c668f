"""The embedded demo: the task and its checker, the shipped demo config, and the pipeline in quick mode."""

import json
import random
from pathlib import Path

import pytest

from score.rl import demo_task
from score.rl.config import load_config
from score.rl.demo import (
    DEMO_RL,
    DEMO_SELF_REFINE,
    DEMO_SFT,
    LABELS,
    METHODS,
    SFT_BASELINES,
    build_tokenizer,
    encode_warmup,
    run_demo,
)
from score.rl.prompts import PromptBuilder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_task_answers_are_checked_not_assumed():
    p = demo_task.make_problem((7, 5, 3, 9))
    assert p.answer == "4" and p.question == "last digit of 7+5+3+9"
    assert demo_task.worked_solution((7, 5, 3, 9)) == "Work: 7+5=2, 2+3=5, 5+9=4. \\boxed{4}"
    assert demo_task.check_answer(demo_task.worked_solution((7, 5, 3, 9)), p.answer) == 1.0
    assert demo_task.check_answer("\\boxed{5}", p.answer) == 0.0
    assert demo_task.check_answer("4", p.answer) == 0.0  # no final answer stated
    assert demo_task.check_answer("Work: 7+5", p.answer) == 0.0  # a worked answer cut by attempt 1's budget


def test_attempt_budgets_hold_a_direct_answer_in_attempt_1_and_a_worked_one_in_attempt_2():
    tok = build_tokenizer(512, 0)
    eos = 1
    worst = (9, 9, 9, 9)
    direct = len(tok.encode(demo_task.direct_answer(9))) + eos
    worked = len(tok.encode(demo_task.worked_solution(worst))) + eos
    assert direct <= DEMO_RL["rollout"]["max_tokens_attempt1"] < worked <= DEMO_RL["rollout"]["max_tokens_attempt2"]


def test_eval_split_is_disjoint_from_training():
    train = {p.id for p in demo_task.problems(500, "train", 0)}
    held_out = {p.id for p in demo_task.problems(300, "eval", 0)}
    assert len(held_out) == 300 and not train & held_out
    rng = random.Random(0)
    for _ in range(300):
        ex = demo_task.warmup_example(rng)
        operands = tuple(int(x) for x in ex.question.rsplit(" ", 1)[-1].split("+"))
        assert demo_task.split_of(operands) == "train"


def test_warmup_traces_are_token_in_token_out():
    tok = build_tokenizer(300, 0)
    builder = PromptBuilder(
        tok, chat=False, system_prompt=None, correction_instruction=demo_task.CORRECTION_INSTRUCTION
    )
    ex = demo_task.WarmupExample("last digit of 1+4+5+3", ("\\boxed{2}", "\\boxed{3}"), (False, True))
    ids, mask = encode_warmup(ex, builder, tok.eos_token_id)
    prompt = builder.first_attempt_ids("last digit of 1+4+5+3")
    first = tok.encode("\\boxed{2}") + [tok.eos_token_id]
    context, _ = builder.second_attempt_ids(prompt, first, "stop")
    assert ids[: len(context)] == context and len(ids) == len(mask)
    assert sum(mask) == len(tok.encode("\\boxed{3}")) + 1  # only the second attempt (+ EOS) is trained


def test_shipped_demo_config_matches_the_demo():
    cfg = load_config(CONFIGS / "demo.toml")
    for section, values in {**DEMO_RL, "sft": DEMO_SFT, "self_refine": DEMO_SELF_REFINE}.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_quick_demo_writes_every_output(tmp_path, capsys):
    results = run_demo(tmp_path, quick=True, ablations=True, baselines=True, progress=False, workers=1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["headroom"]) == {"direct", "worked"}
    assert set(saved["methods"]) == {"base", "self_refine", *METHODS, *SFT_BASELINES}
    for name, method in saved["methods"].items():
        runs = method["seeds"]
        assert len(runs) == (1 if name in ("base", "self_refine") else 2)
        for run in runs:
            assert run["delta"] == pytest.approx(run["delta_i2c"] - run["delta_c2i"])
            rows = [json.loads(line) for line in open(tmp_path / "eval" / f"{name}_seed{run['seed']}.jsonl")]
            assert len(rows) == run["n"] and all({"id", "r1", "r2"} <= set(r) for r in rows)
            # every number of the table is recomputed from the per-problem records
            assert run["acc_t1"] == pytest.approx(sum(r["r1"] for r in rows) / len(rows))
            assert run["acc_t2"] == pytest.approx(sum(r["r2"] for r in rows) / len(rows))
        for key in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed_frac"):
            values = [r[key] for r in runs]
            assert method["mean"][key] == pytest.approx(sum(values) / len(values))
            if len(values) > 1:
                mean = sum(values) / len(values)
                se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
                assert method["stderr"][key] == pytest.approx(se)
            else:
                assert method["stderr"][key] is None
    assert saved["methods"]["score"] == results["methods"]["score"]  # JSON keeps floats exactly
    headroom_rows = [json.loads(line) for line in open(tmp_path / "eval" / "headroom.jsonl")]
    assert saved["headroom"]["worked"] == pytest.approx(sum(r["worked"] for r in headroom_rows) / len(headroom_rows))
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "base" / f).exists()
    assert (tmp_path / "runs" / "score_seed0" / "metrics.jsonl").exists()
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"accuracy_bars.png", "training_curves.png"}
    out = capsys.readouterr().out
    for label in LABELS.values():
        assert label in out
    for name in SFT_BASELINES:
        assert (tmp_path / "runs" / f"{name}_seed0" / "sft_data.json").exists()
    assert "headroom" in out and "±" in out
