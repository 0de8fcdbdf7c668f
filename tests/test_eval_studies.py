"""Test-time studies of `score eval`: more attempts than trained, attempt 2 after given first
attempts (the distribution-shift diagnostic), and inference-compute scaling by majority vote."""

import json

import pytest

from score.model import Engine, from_pretrained, load_tokenizer
from score.model.engine.sampling import SamplingParams
from score.rl.cli import main
from score.rl.config import to_toml
from score.rl.data import Problem
from score.rl.evaluate import evaluate, evaluate_given_first_attempts, evaluate_self_refine, read_first_attempts
from score.rl.prompts import PromptBuilder
from score.rl.rollout import RolloutSpec, run_rollout
from score.rl.scaling import inference_scaling, majority_vote, parse_budgets
from tests.helpers.tiny_run import make_base, tiny_config, write_problems


class FirstLetterParity:
    """A deterministic stand-in checker an untrained model can pass: the answer is a text's first
    character, and a text is right when its length is even."""

    def __call__(self, texts, problems):
        return [float(len(t) % 2 == 0) for t in texts]

    def answer_of(self, text):
        return text[:1] or None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    _, _, base = make_base(root)
    model, tokenizer = from_pretrained(base), load_tokenizer(base)
    builder = PromptBuilder(tokenizer, chat=False, system_prompt=None, correction_instruction="Check the sum.")
    problems = [Problem(id=f"p{i}", question=f"last digit of {i}+{i + 3}+5", answer=str(i % 10)) for i in range(6)]
    return model, builder, problems, root


def engine_for(model):
    return Engine(model, max_num_seqs=16, num_blocks=256)


# ---- majority vote -------------------------------------------------------------------------


def test_majority_vote_counts_answers_and_breaks_ties_by_first_seen():
    assert majority_vote(["4", "3", "3"], [1, 0, 0]) == 0.0
    assert majority_vote(["4", "3", "4"], [1, 0, 1]) == 1.0
    # A 1-1 tie goes to the answer seen first, whichever is right.
    assert majority_vote(["4", "3"], [1, 0]) == 1.0
    assert majority_vote(["3", "4"], [0, 1]) == 0.0
    assert majority_vote(["3", "4", "4", "3"], [0, 1, 1, 0]) == 0.0
    # Samples without an answer do not vote; whitespace does not split a vote.
    assert majority_vote([None, None, "5"], [0, 0, 1]) == 1.0
    assert majority_vote([None, None], [0, 0]) == 0.0
    assert majority_vote(["x  + 1", "x + 1", "2"], [1, 1, 0]) == 1.0


def test_budgets_are_parsed_and_bad_ones_named():
    assert parse_budgets("1,2,4,8,16") == [1, 2, 4, 8, 16]
    for bad, message in (("1,x", "comma-separated"), ("4,2", "increasing"), ("0,2", "positive"), ("1,3", "even")):
        with pytest.raises(ValueError, match=message):
            parse_budgets(bad)


# ---- more attempts -------------------------------------------------------------------------


def test_two_attempts_is_todays_evaluation_and_more_extend_it(tiny):
    model, builder, problems, _ = tiny
    reward = FirstLetterParity()
    two, records2 = evaluate(engine_for(model), builder, problems, reward, budgets=(4, 6))
    again, records_again = evaluate(engine_for(model), builder, problems, reward, budgets=(4, 6), attempts=2)
    assert (again, records_again) == (two, records2)
    assert "acc_t3" not in two

    engine = engine_for(model)
    four, records4 = evaluate(engine, builder, problems, reward, budgets=(4, 6), attempts=4)
    for r2, r4 in zip(records2, records4, strict=True):
        assert {k: r4[k] for k in r2} == r2  # the first two attempts are unchanged
        assert {"attempt3", "attempt4", "r3", "r4", "answer4", "finish4"} <= set(r4)
    assert len(four["acc_per_attempt"]) == 4
    for a in range(1, 5):
        assert four[f"acc_t{a}"] == sum(r[f"r{a}"] for r in records4) / len(records4)
    assert four["acc_t1"] == two["acc_t1"] and four["acc_t2"] == two["acc_t2"]
    # Each later attempt extends the one before token by token: its whole context came from the cache.
    assert engine.stats.reused_tokens > 0
    with pytest.raises(ValueError, match="attempts must be an int >= 2"):
        evaluate(engine, builder, problems, reward, budgets=(4, 6), attempts=1)
    with pytest.raises(ValueError, match=r"6 of 6 problems cannot hold 40 attempts .* max_model_len=256: p0, p1"):
        evaluate(engine, builder, problems, reward, budgets=(4, 6), attempts=40)


def test_attempt_three_follows_attempt_two_and_the_instruction_again(tiny):
    model, builder, problems, _ = tiny
    reward = FirstLetterParity()
    _, records = evaluate(engine_for(model), builder, problems, reward, budgets=(4, 6), attempts=3)
    # Attempt 3 by hand: the greedy two-attempt trajectories' ids, the instruction again, greedy.
    greedy = RolloutSpec(k=1, temperature=0.0, budgets=(4, 6))
    trajectories, _ = run_rollout(engine_for(model), builder, problems, reward, greedy)
    contexts = [
        builder.second_attempt_ids(t.token_ids[: -len(two.ids) or None], two.ids, two.finish)[0]
        for t, two in ((t, t.attempts[1]) for t in trajectories)
    ]
    outs = engine_for(model).generate(contexts, SamplingParams(temperature=0.0, max_tokens=6))
    tok = builder.tokenizer
    assert [r["attempt3"] for r in records] == [tok.decode(o[0].token_ids, skip_special_tokens=True) for o in outs]
    assert [r["r3"] for r in records] == reward([r["attempt3"] for r in records], problems)


# ---- given first attempts ------------------------------------------------------------------


def test_first_attempts_file_errors_name_file_and_line(tmp_path, tiny):
    problems = tiny[2]
    path = tmp_path / "first.jsonl"
    cases = [
        ([{"id": "p0"}], r"first.jsonl line 1: missing key 'attempt1'"),
        ([{"id": "p0", "attempt1": "a"}, {"id": "nope", "attempt1": "b"}], r"line 2: problem id 'nope' is not in"),
        ([{"id": "p0", "attempt1": "a"}, {"id": "p0", "attempt1": "b"}], r"line 2: problem id 'p0' appears twice"),
        ([{"id": "p1", "attempt1": 3}], r"line 1: 'attempt1' must be a string"),
    ]
    for rows, message in cases:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(ValueError, match=message):
            read_first_attempts(path, problems)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no first attempts"):
        read_first_attempts(path, problems)


def test_attempt_two_after_given_first_attempts(tmp_path, tiny):
    model, builder, problems, _ = tiny
    texts = {"p3": "xy", "p1": "abc"}
    path = tmp_path / "first.jsonl"
    path.write_text("".join(json.dumps({"id": i, "attempt1": t, "extra": 1}) + "\n" for i, t in texts.items()))
    given = read_first_attempts(path, problems)
    assert [(p.id, t) for p, t in given] == list(texts.items())  # file order
    metrics, records = evaluate_given_first_attempts(engine_for(model), builder, given, FirstLetterParity(), budget=6)
    assert [r["attempt1"] for r in records] == ["xy", "abc"]
    assert [r["r1"] for r in records] == [1.0, 0.0] and metrics["acc_t1"] == 0.5
    assert all(r["finish1"] == "given" for r in records)
    # Attempt 2 is the greedy continuation of prompt + given text + (end of reply) + instruction.
    tok = builder.tokenizer
    ctx, _ = builder.second_attempt_ids(builder.first_attempt_ids(problems[3].question), tok.encode("xy"), "stop")
    out = engine_for(model).generate([ctx], SamplingParams(temperature=0.0, max_tokens=6))[0][0]
    assert records[0]["attempt2"] == tok.decode(out.token_ids, skip_special_tokens=True)


# ---- inference-compute scaling -------------------------------------------------------------


def test_scaling_votes_over_nested_samples(tiny):
    model, builder, problems, _ = tiny
    reward = FirstLetterParity()
    engine, generated = engine_for(model), []
    real_generate = engine.generate

    def counting_generate(prompts, *args, **kwargs):
        generated.append(len(prompts))
        return real_generate(prompts, *args, **kwargs)

    engine.generate = counting_generate
    result = inference_scaling(
        engine,
        builder,
        problems,
        reward,
        budgets=[1, 2, 4],
        temperature=1.0,
        token_budgets=(4, 6),
        seed=3,
    )
    assert result["budgets"] == [1, 2, 4] and result["samples_per_problem"] == 4
    # 4 first attempts per problem, but attempt 2 only for the 2 that budget 4's sequential vote uses
    assert result["second_attempts_per_problem"] == 2 and generated == [len(problems), 2 * len(problems)]
    assert result["sequential"][0] is None and all(0.0 <= a <= 1.0 for a in result["parallel"])
    # Budget 1 is a single sample: its accuracy is the mean reward of each problem's first sample;
    # budget 2 sequential is each problem's first second attempt.
    spec = RolloutSpec(k=4, temperature=1.0, budgets=(4, 6), seed=3)
    trajectories, _ = run_rollout(engine_for(model), builder, problems, reward, spec)
    firsts = trajectories[::4]
    assert result["parallel"][0] == pytest.approx(sum(t.rewards[0] for t in firsts) / len(problems))
    assert result["sequential"][1] == pytest.approx(sum(t.rewards[1] for t in firsts) / len(problems))
    expected4 = [
        majority_vote([t.attempts[0].text[:1] or None for t in g], [t.rewards[0] for t in g])
        for g in (trajectories[i : i + 4] for i in range(0, len(trajectories), 4))
    ]
    assert result["parallel"][2] == pytest.approx(sum(expected4) / len(problems))
    sequential4 = [
        majority_vote([t.attempts[1].text[:1] or None for t in g], [t.rewards[1] for t in g])
        for g in (trajectories[i : i + 2] for i in range(0, len(trajectories), 4))
    ]
    assert result["sequential"][2] == pytest.approx(sum(sequential4) / len(problems))


def test_scaling_refuses_code_rewards(tiny):
    model, builder, problems, _ = tiny

    class Code(FirstLetterParity):
        kind = "code"

    with pytest.raises(NotImplementedError, match="programs, not answers"):
        inference_scaling(
            engine_for(model), builder, problems, Code(), budgets=[2], temperature=1.0, token_budgets=(4, 4), seed=0
        )


# ---- Self-Refine ---------------------------------------------------------------------------


def test_self_refine_critiques_attempt_one_then_rewrites_it_in_one_conversation(tiny):
    model, builder, problems, _ = tiny
    critique, refine = builder.with_instruction("Find the error."), builder.with_instruction("Now fix it.")
    reward = FirstLetterParity()
    metrics, records = evaluate_self_refine(
        engine_for(model), builder, (critique, refine), problems, reward, budgets=(4, 6), critique_budget=5
    )
    # By hand: greedy attempt 1, then the critique turn and a greedy critique, then the refine turn
    # and a greedy rewrite; every context extends the one before it token by token.
    tok, engine = builder.tokenizer, engine_for(model)

    def greedy(contexts, budget):
        return [o[0] for o in engine.generate(contexts, SamplingParams(temperature=0.0, max_tokens=budget))]

    prompts = [builder.first_attempt_ids(p.question) for p in problems]
    first = greedy(prompts, 4)
    ctx = [critique.second_attempt_ids(p, o.token_ids, o.finish_reason)[0] for p, o in zip(prompts, first, strict=True)]
    assert all(
        c[len(p) + len(o.token_ids) :] == critique.instruction_ids for c, p, o in zip(ctx, prompts, first, strict=True)
    )
    said = greedy(ctx, 5)
    ctx = [refine.second_attempt_ids(c, o.token_ids, o.finish_reason)[0] for c, o in zip(ctx, said, strict=True)]
    second = greedy(ctx, 6)
    decode = lambda o: tok.decode(o.token_ids, skip_special_tokens=True)  # noqa: E731
    assert [r["attempt1"] for r in records] == [decode(o) for o in first]
    assert [r["critique"] for r in records] == [decode(o) for o in said]
    assert [r["attempt2"] for r in records] == [decode(o) for o in second]
    assert [r["r2"] for r in records] == reward([decode(o) for o in second], problems)
    assert metrics["n"] == len(problems) and metrics["acc_t2"] == sum(r["r2"] for r in records) / len(records)
    with pytest.raises(ValueError, match="cannot hold Self-Refine's attempt, critique and rewrite"):
        evaluate_self_refine(engine, builder, (critique, refine), problems, reward, budgets=(4, 6), critique_budget=250)


def test_self_refine_turns_default_to_a_critique_request_and_the_runs_instruction(tmp_path):
    from score.rl.factories import prompt_builder, self_refine_builders
    from score.rl.prompts import CRITIQUE_INSTRUCTION

    cfg = tiny_config(tmp_path)
    builder = prompt_builder(cfg, load_tokenizer(cfg.model.path))
    critique, refine = self_refine_builders(cfg, builder)
    assert critique.correction_instruction == CRITIQUE_INSTRUCTION
    assert refine.correction_instruction == builder.correction_instruction
    cfg.self_refine.critique_instruction = "  "
    with pytest.raises(ValueError, match="self_refine.critique_instruction must not be empty"):
        self_refine_builders(cfg, builder)


# ---- the CLI -------------------------------------------------------------------------------


def test_cli_attempts_first_attempts_and_scaling(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    data = write_problems(tmp_path / "eval.jsonl", 4, split="eval")
    common = ["eval", "--model", str(tmp_path / "base"), "--data", str(data), "--config", str(config)]

    assert main([*common, "--out", str(tmp_path / "a3"), "--attempts", "3"]) == 0
    metrics = json.load(open(tmp_path / "a3" / "eval_metrics.json"))
    assert len(metrics["acc_per_attempt"]) == 3 and "acc_t3" in metrics
    assert (tmp_path / "a3" / "plots" / "attempts.png").stat().st_size > 0
    assert "accuracy per attempt: t1:" in capsys.readouterr().out

    assert (
        main([*common, "--out", str(tmp_path / "given"), "--first-attempts", str(tmp_path / "a3" / "eval.jsonl")]) == 0
    )
    given = [json.loads(line) for line in open(tmp_path / "given" / "eval.jsonl")]
    own = [json.loads(line) for line in open(tmp_path / "a3" / "eval.jsonl")]
    assert [g["attempt1"] for g in given] == [o["attempt1"] for o in own]

    assert main([*common, "--out", str(tmp_path / "scale"), "--scaling", "1,2,4", "--seed", "1"]) == 0
    scaling = json.load(open(tmp_path / "scale" / "scaling.json"))
    assert scaling["budgets"] == [1, 2, 4] and len(scaling["parallel"]) == 3 and scaling["sequential"][0] is None
    assert (tmp_path / "scale" / "plots" / "scaling.png").stat().st_size > 0
    assert "| samples B | parallel | sequential |" in capsys.readouterr().out

    assert main([*common, "--out", str(tmp_path / "x"), "--scaling", "3,1"]) == 2
    assert "--scaling budgets must be increasing" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "x"), "--attempts", "1"]) == 2
    assert "--attempts must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the studies are exclusive
        main([*common, "--out", str(tmp_path / "x"), "--attempts", "3", "--scaling", "2"])

    refine = ["--set", "self_refine.max_tokens_critique=4"]
    assert main([*common, "--out", str(tmp_path / "refine"), "--self-refine", *refine]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "refine" / "eval.jsonl")]
    assert len(rows) == 4 and all("critique" in r for r in rows)
    assert json.load(open(tmp_path / "refine" / "eval_metrics.json"))["n"] == 4


def test_cli_eval_logs_to_wandb_as_train_does(tmp_path, monkeypatch):
    """run.wandb in `score eval` (WANDB_MODE=offline): the config with the command's arguments, the
    figures as the summary, and the curve per attempt or per sample budget as the history."""
    from tests.helpers.wandb_records import history_config_summary, offline_run_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path)
    cfg.run.wandb, cfg.run.wandb_project = True, "tests"
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    data = write_problems(tmp_path / "eval.jsonl", 4, split="eval")
    common = ["eval", "--model", str(tmp_path / "base"), "--data", str(data), "--config", str(config), "--quiet"]

    assert main([*common, "--out", str(tmp_path / "a3"), "--attempts", "3"]) == 0
    run_file = offline_run_file(tmp_path / "a3")
    history, config_values, summary = history_config_summary(run_file)
    metrics = json.load(open(tmp_path / "a3" / "eval_metrics.json"))
    assert [int(h["_step"]) for h in history] == [1, 2, 3]
    assert [json.loads(h["eval/acc"]) for h in history] == pytest.approx(metrics["acc_per_attempt"])
    for key in ("acc_t1", "acc_t2", "acc_t3", "delta"):
        assert json.loads(summary[f"eval/{key}"]) == pytest.approx(metrics[key])
    assert json.loads(config_values["score_eval"])["attempts"] == 3
    assert json.loads(config_values["optim"])["lr"] == cfg.optim.lr
    assert (tmp_path / "a3" / "wandb_id").read_text().strip() in run_file.name

    assert main([*common, "--out", str(tmp_path / "scale"), "--scaling", "1,2,4", "--seed", "1"]) == 0
    run_file = offline_run_file(tmp_path / "scale")
    history, config_values, summary = history_config_summary(run_file)
    scaling = json.load(open(tmp_path / "scale" / "scaling.json"))
    assert [int(h["_step"]) for h in history] == [1, 2, 4]
    assert [json.loads(h["scaling/parallel"]) for h in history] == pytest.approx(scaling["parallel"])
    assert "scaling/sequential" not in history[0]  # budget 1 has no sequential point
    assert [json.loads(h["scaling/sequential"]) for h in history[1:]] == pytest.approx(scaling["sequential"][1:])
    assert json.loads(summary["scaling/second_attempts_per_problem"]) == 2
    assert json.loads(config_values["score_eval"])["scaling"] == "1,2,4"
