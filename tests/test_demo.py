"""The embedded demo: the task and its checker, the shipped demo config, and the pipeline in quick mode."""

import json
import random
from pathlib import Path

import pytest

from score.rl.config import load_config
from score.rl.demo import task as demo_task
from score.rl.demo.base_model import build_tokenizer, encode_warmup
from score.rl.demo.run import run_demo
from score.rl.demo.settings import DEMO_RL, DEMO_SELF_REFINE, DEMO_SFT, LABELS, METHODS, SFT_BASELINES
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


def test_recall_warmup_shows_each_training_problem_with_its_right_and_one_wrong_answer():
    recall = ((1, 2, 3, 4), (9, 9, 9, 8), (0, 5, 0, 5))
    mix = demo_task.WarmupMix(direct=1.0, worked=0.0, recall=1.0, recall_right=0.5)
    rng = random.Random(0)
    right = 0
    for _ in range(600):
        ex = demo_task.warmup_example(rng, mix, recall)
        operands = tuple(int(x) for x in ex.question.rsplit(" ", 1)[-1].split("+"))
        assert operands in recall and ex.trained == (True,)
        given = int(demo_task.extract_final_answer(ex.attempts[0]))
        assert given in (sum(operands) % 10, demo_task.misremembered(operands))
        right += given == sum(operands) % 10
    assert 0.42 < right / 600 < 0.58
    assert all(demo_task.misremembered(o) != sum(o) % 10 for o in recall)
    with pytest.raises(ValueError, match="recall problems"):
        demo_task.warmup_example(rng, mix, ())


def test_worked_start_leaves_the_first_words_of_other_worked_attempts_untrained():
    tok = build_tokenizer(300, 0)
    builder = PromptBuilder(
        tok, chat=False, system_prompt=None, correction_instruction=demo_task.CORRECTION_INSTRUCTION
    )
    only_worked_traces = {"direct": 0.0, "worked": 0.0, "restate": 0.0, "reguess": 0.0}
    ex = demo_task.warmup_example(random.Random(0), demo_task.WarmupMix(**only_worked_traces, worked_start=0.0))
    assert ex.untrained_start == demo_task.WORKED_PREFIX and ex.attempts[1].startswith(demo_task.WORKED_PREFIX)
    ids, mask = encode_warmup(ex, builder, tok.eos_token_id)
    second = tok.encode(ex.attempts[1]) + [tok.eos_token_id]
    start = len(tok.encode(demo_task.WORKED_PREFIX))
    assert ids[-len(second) :] == second and mask[-len(second) :] == [0] * start + [1] * (len(second) - start)
    shown = demo_task.warmup_example(random.Random(0), demo_task.WarmupMix(**only_worked_traces))
    assert shown.untrained_start == "" and shown.attempts == ex.attempts


def test_slipped_worked_answers_follow_their_own_steps():
    rng = random.Random(0)
    slips = steps = 0
    for _ in range(300):
        operands = tuple(rng.randint(0, 9) for _ in range(4))
        text = demo_task.worked_solution(operands, slip=0.3, rng=rng)
        acc = operands[0]
        for part, x in zip(
            text.removeprefix(demo_task.WORKED_PREFIX).split(". ")[0].split(", "), operands[1:], strict=True
        ):
            left, result = part.split("=")
            assert left == f"{acc}+{x}"
            slips += int(result) != (acc + x) % 10
            steps += 1
            acc = int(result)
        assert demo_task.check_answer(text, str(acc)) == 1.0
    assert 0.25 < slips / steps < 0.35
    assert demo_task.worked_solution((7, 5, 3, 9), slip=0.0) == "Work: 7+5=2, 2+3=5, 5+9=4. \\boxed{4}"


def test_settings_name_what_the_base_model_was_shown():
    assert demo_task.DEFAULT_SETTING in demo_task.SETTINGS
    guess = demo_task.SETTINGS["guess"]
    # the demo as it was before the recall setting
    assert guess.mix == demo_task.WarmupMix() and (guess.train_problems, guess.prompts_per_step) == (4000, 16)
    recall = demo_task.SETTINGS["recall"]
    assert recall.mix.recall == 1.0 and recall.mix.recall_right < 1.0 and recall.mix.worked_start < 1.0


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
    assert set(saved["headroom"]) == set(saved["headroom_train"]) == {"direct", "worked"}
    assert saved["setting"] == demo_task.DEFAULT_SETTING
    assert set(saved["methods"]) == {"base", "self_refine", "multi_turn_rl", *METHODS, *SFT_BASELINES}
    sections = _score_sections(tmp_path)
    steps = {name: cfg["stage1_steps"] + cfg["stage2_steps"] for name, cfg in sections.items()}
    for name, method in saved["methods"].items():
        runs = method["seeds"]
        assert len(runs) == (1 if name in ("base", "self_refine") else 2)
        for run in runs:
            for stats, suffix in ((run, ""), (run["train"], "_train")):  # held-out, then training problems
                assert stats["delta"] == pytest.approx(stats["delta_i2c"] - stats["delta_c2i"])
                rows = [
                    json.loads(line) for line in open(tmp_path / "eval" / f"{name}_seed{run['seed']}{suffix}.jsonl")
                ]
                assert len(rows) == stats["n"] and all({"id", "r1", "r2"} <= set(r) for r in rows)
                # every number of the table is recomputed from the per-problem records
                assert stats["acc_t1"] == pytest.approx(sum(r["r1"] for r in rows) / len(rows))
                assert stats["acc_t2"] == pytest.approx(sum(r["r2"] for r in rows) / len(rows))
            assert {r["id"] for r in rows} <= {
                json.loads(line)["id"] for line in open(tmp_path / "data" / "train.jsonl")
            }
        for key in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed_frac", "edit_ratio"):
            for summary, values in (
                (method, [r[key] for r in runs]),
                (method["train"], [r["train"][key] for r in runs]),
            ):
                assert summary["mean"][key] == pytest.approx(sum(values) / len(values))
                if len(values) > 1:
                    mean = sum(values) / len(values)
                    se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
                    assert summary["stderr"][key] == pytest.approx(se)
                else:
                    assert summary["stderr"][key] is None
        if name in steps:  # an RL run: its per-step diagnostics, as its metrics.jsonl logged them
            for run in runs:
                logged = [
                    json.loads(line) for line in open(tmp_path / "runs" / f"{name}_seed{run['seed']}" / "metrics.jsonl")
                ]
                assert len(run["curves"]["stage"]) == len(logged) == steps[name]
                for key in ("changed_frac", "edit_ratio", "reward_1"):
                    if name == "single_turn" and key != "reward_1":
                        assert key not in run["curves"]  # no attempt 2
                        continue
                    assert run["curves"][key] == [r[key] for r in logged]
            mean_curve = method["curves"]["reward_1"]
            assert mean_curve == pytest.approx(
                [sum(c) / len(c) for c in zip(*(r["curves"]["reward_1"] for r in runs), strict=True)]
            )
            assert method["curves"]["stage2_step"] == (
                sections[name]["stage1_steps"] + 1 if sections[name]["stage1_steps"] else None
            )
        else:
            assert "curves" not in method
    assert saved["methods"]["score"] == results["methods"]["score"]  # JSON keeps floats exactly
    headroom_rows = [json.loads(line) for line in open(tmp_path / "eval" / "headroom.jsonl")]
    assert saved["headroom"]["worked"] == pytest.approx(sum(r["worked"] for r in headroom_rows) / len(headroom_rows))
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "base" / f).exists()
    assert (tmp_path / "runs" / "score_seed0" / "metrics.jsonl").exists()
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {
        "accuracy_bars.png",
        "training_curves.png",
        "collapse.png",
    }
    out = capsys.readouterr().out
    for label in LABELS.values():
        assert label in out
    for name in SFT_BASELINES:
        assert (tmp_path / "runs" / f"{name}_seed0" / "sft_data.json").exists()
    assert "headroom" in out and "±" in out and "training problems" in out


def _score_sections(demo_dir: Path) -> dict:
    """{RL method: its run's [score] section} of a demo folder."""
    from score.rl.config import load_config

    return {
        folder.name.rsplit("_seed", 1)[0]: load_config(folder / "config.toml").to_dict()["score"]
        for folder in (demo_dir / "runs").iterdir()
        if folder.name.rsplit("_seed", 1)[0] in METHODS
    }


def test_demo_settings_are_checked_and_kept_apart(tmp_path):
    with pytest.raises(ValueError, match="--setting must be one of"):
        run_demo(tmp_path / "a", quick=True, setting="memorise", progress=False, workers=1)
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"seed": 0, "quick": True, "setting": "guess"}))
    with pytest.raises(FileExistsError, match="holds the demo of"):
        run_demo(out, quick=True, progress=False, workers=1)


def test_collapse_plot_gives_each_method_one_colour_in_every_panel(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from score.rl import plots

    steps = [0.1, 0.2, 0.3]
    curves = {
        "score": {"reward_1": steps, "changed_frac": steps, "edit_ratio": steps, "stage2_step": 2},
        "single_turn": {"reward_1": steps, "stage2_step": None},  # no attempt 2: one panel only
        "no_shaping": {"reward_1": steps, "changed_frac": steps, "edit_ratio": steps, "stage2_step": 2},
    }
    figures = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: figures.append(subplots(*a, **k)) or figures[-1])
    monkeypatch.setattr(plt, "close", lambda fig: None)
    results = {"methods": {name: {"curves": c} for name, c in curves.items()}}
    assert plots.plot_collapse(results, tmp_path, labels=LABELS).is_file()
    (_, axes) = figures[0]
    colour = {}
    for ax in axes:
        for line in ax.get_lines():
            if line.get_label() in (LABELS[n] for n in curves):
                assert colour.setdefault(line.get_label(), line.get_color()) == line.get_color()
    assert len(set(colour.values())) == len(curves)
