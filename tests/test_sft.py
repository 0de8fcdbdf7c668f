"""The supervised self-correction baselines (`score sft`): which traces STaR and Pair-SFT keep, the
SFT loss against a float64 NLL, and whole runs on a tiny model (rounds, data files, metrics)."""

import copy
import json

import pytest
import torch

from score.model import from_pretrained, load_tokenizer
from score.rl import sft
from score.rl.cli import main
from score.rl.config import to_toml
from score.rl.data import Problem
from score.rl.precision import Precision
from score.rl.prompts import PromptBuilder
from score.rl.rollout import Attempt, Trajectory
from score.rl.trainer import RunFailed
from tests.helpers.tiny_run import ParityReward, make_base, tiny_config, write_problems


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model, tokenizer, base = make_base(root)
    builder = PromptBuilder(tokenizer, chat=False, system_prompt=None, correction_instruction="Check it.")
    return model, builder, root


def sample(builder, problem, attempt, r1, attempt2=None, r2=0.0, finish="stop"):
    """A hand-made trajectory of `problem` (token ids from the texts)."""
    tok = builder.tokenizer
    prompt = builder.first_attempt_ids(problem.question)
    a1 = tok.encode(attempt)
    ctx, (a, b) = builder.second_attempt_ids(prompt, a1, finish)
    attempts = [Attempt([], a1, [-1.0] * len(a1), finish, attempt, r1)]
    if attempt2 is not None:
        a2 = tok.encode(attempt2)
        attempts.append(Attempt(ctx[a:b], a2, [-1.0] * len(a2), "stop", attempt2, r2))
    return Trajectory(group=0, problem=problem, prompt_ids=prompt, attempts=attempts)


def texts(t):
    return tuple(a.text for a in t.attempts)


P = [Problem(id=f"p{i}", question=f"last digit of {i}+1+2+3", answer=str((i + 6) % 10)) for i in range(3)]


# ---- the datasets --------------------------------------------------------------------------


def test_star_keeps_wrong_then_right_traces_and_with_plus_right_then_right(tiny):
    _, builder, _ = tiny
    traces = [
        sample(builder, P[0], "1", 0.0, "6", 1.0),  # wrong -> right: kept
        sample(builder, P[0], "6", 1.0, "6", 1.0),  # right -> right: kept with include_correct
        sample(builder, P[0], "6", 1.0, "2", 0.0),  # right -> wrong: never
        sample(builder, P[1], "3", 0.0, "4", 0.0),  # wrong -> wrong: never
        sample(builder, P[1], "9", 0.0, "7", 1.0),  # wrong -> right: kept
    ]
    plain = sft.star_traces(traces, include_correct=False)
    assert [texts(t) for t in plain] == [("1", "6"), ("9", "7")]
    plus = sft.star_traces(traces, include_correct=True)
    assert [texts(t) for t in plus] == [("1", "6"), ("6", "6"), ("9", "7")]
    for t in plus:  # attempt 1 is context: only attempt 2's tokens are trained
        labels = t.attempt_labels
        one, two = t.attempts
        assert set(labels[: len(t.prompt_ids) + len(one.ids) + len(two.instruction_ids)]) == {0}
        assert labels[-len(two.ids) :] == [2] * len(two.ids)
    assert [t.group for t in plus] == [0, 1, 2]
    assert not traces[0].first_from_base  # the samples themselves are not changed


def test_pair_sft_pairs_each_wrong_sample_with_a_right_one_of_its_problem(tiny):
    _, builder, _ = tiny
    samples = [
        sample(builder, P[0], "1", 0.0),
        sample(builder, P[0], "2", 0.0, finish="length"),
        sample(builder, P[0], "6", 1.0),
        sample(builder, P[1], "3", 0.0),  # no right sample of p1: no pair
        sample(builder, P[1], "4", 0.0),
        sample(builder, P[2], "8", 1.0),
        sample(builder, P[2], "8!", 1.0),
    ]
    plain = sft.pair_sft_traces(samples, builder, include_correct=False, seed=0)
    assert [(t.problem.id, *texts(t), *t.rewards) for t in plain] == [
        ("p0", "1", "6", 0.0, 1.0),
        ("p0", "2", "6", 0.0, 1.0),
    ]
    for t, s in zip(plain, samples[:2], strict=True):
        # attempt 1 keeps its ids and ending; the instruction is the builder's for that ending
        ctx, _ = builder.second_attempt_ids(s.prompt_ids, s.attempts[0].ids, s.attempts[0].finish)
        assert t.token_ids == ctx + samples[2].attempts[0].ids
        assert t.first_from_base and t.attempt_labels.count(1) == 0
    plus = sft.pair_sft_traces(samples, builder, include_correct=True, seed=0)
    pairs = [(t.problem.id, *texts(t)) for t in plus]
    # the lone right sample of p0 is paired with itself; p2's two right samples with each other
    assert pairs == [("p0", "1", "6"), ("p0", "2", "6"), ("p0", "6", "6"), ("p2", "8", "8!"), ("p2", "8!", "8")]
    assert [t.group for t in plus] == list(range(5))


def test_pair_sft_choice_of_the_right_partner_is_seeded(tiny):
    _, builder, _ = tiny
    samples = [sample(builder, P[0], str(i), 0.0) for i in range(6)] + [
        sample(builder, P[0], "6", 1.0),
        sample(builder, P[0], "6.", 1.0),
    ]
    a = [texts(t)[1] for t in sft.pair_sft_traces(samples, builder, include_correct=False, seed=3)]
    assert a == [texts(t)[1] for t in sft.pair_sft_traces(samples, builder, include_correct=False, seed=3)]
    assert set(a) <= {"6", "6."} and len(a) == 6


# ---- the loss ------------------------------------------------------------------------------


FP32_CPU = Precision(torch.device("cpu"), torch.float32, torch.float32, "auto")


def test_sft_loss_is_the_nll_of_attempt_two_tokens_against_float64(tiny):
    model, builder, _ = tiny
    traces = sft.star_traces(
        [
            sample(builder, P[0], "1", 0.0, "Work: 1+1=2, 2+2=4. \\boxed{6}", 1.0),
            sample(builder, P[1], "3 and more", 0.0, "7", 1.0, finish="length"),
            sample(builder, P[2], "8", 1.0, "8", 1.0),
        ],
        include_correct=True,
    )
    count = sft.trained_tokens(traces)
    assert count == sum(len(t.attempts[1].ids) for t in traces)
    loss = sft.sft_loss(model, traces, float(count), FP32_CPU)
    ref_model = copy.deepcopy(model).double()
    nll = torch.zeros((), dtype=torch.float64)
    for t in traces:
        ids = torch.tensor(t.token_ids)
        logp = ref_model(ids[None])[0].double().log_softmax(-1)
        start = len(t.token_ids) - len(t.attempts[1].ids)
        for pos in range(start, len(t.token_ids)):  # row pos - 1 predicts token pos
            nll -= logp[pos - 1, ids[pos]]
    torch.testing.assert_close(loss.double(), nll / count, rtol=1e-5, atol=1e-6)
    loss.backward()  # the fused kernel's backward reaches the weights
    assert model.lm_head_weight.grad is not None and torch.isfinite(model.lm_head_weight.grad).all()
    model.zero_grad(set_to_none=True)


# ---- whole runs ----------------------------------------------------------------------------


def sft_config(root, **sft_keys):
    cfg = tiny_config(root, optim__lr=1e-2)
    for key, value in {"max_problems": 6, "epochs": 2, "batch_size": 4, "micro_batch_size": 2, **sft_keys}.items():
        setattr(cfg.sft, key, value)
    return cfg


@pytest.mark.parametrize("kind", ["star", "pair_sft"])
def test_a_run_samples_each_round_from_the_last_model_and_trains_the_base_afresh(tmp_path, monkeypatch, kind):
    cfg = sft_config(tmp_path, kind=kind, include_correct=True)
    monkeypatch.setattr(sft, "make_reward", lambda cfg: ParityReward())
    base_state = {k: v.clone() for k, v in from_pretrained(cfg.model.path).state_dict().items()}
    sampled_from, trained_from = [], []
    build_round, train_round = sft.build_round, sft.train_round

    def recording_build(cfg, model, *args, **kwargs):
        sampled_from.append({k: v.clone() for k, v in model.state_dict().items()})
        return build_round(cfg, model, *args, **kwargs)

    def recording_train(cfg, policy, *args):
        trained_from.append({k: v.clone() for k, v in policy.state_dict().items()})
        out = train_round(cfg, policy, *args)
        trained_from[-1] = (trained_from[-1], {k: v.clone() for k, v in policy.state_dict().items()})
        return out

    monkeypatch.setattr(sft, "build_round", recording_build)
    monkeypatch.setattr(sft, "train_round", recording_train)
    final = sft.run_sft(cfg, tmp_path / "run")

    rounds = 3 if kind == "star" else 1
    assert len(sampled_from) == len(trained_from) == rounds
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(sampled_from[0], base_state)
    for i, (start, end) in enumerate(trained_from):
        assert same(start, base_state), f"round {i} did not start from the base model"
        assert not same(end, base_state)
        if i + 1 < rounds:
            assert same(sampled_from[i + 1], end), f"round {i + 1} did not sample from round {i}'s model"
    trained = from_pretrained(final).state_dict()
    assert same({k: v for k, v in trained.items()}, trained_from[-1][1])

    stats = json.loads((tmp_path / "run" / "sft_data.json").read_text())
    assert stats["kind"] == kind and len(stats["rounds"]) == rounds
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert len(metrics) == sum(r["steps"] for r in stats["rounds"])
    for r in stats["rounds"]:
        rows = [json.loads(line) for line in open(tmp_path / "run" / "data" / f"round{r['round']}.jsonl")]
        assert len(rows) == r["traces"] > 0 and r["sampled"] == 6 * cfg.rollout.samples_per_prompt
        assert all(row["r2"] == 1.0 for row in rows)
        assert r["wrong_to_right"] + r["right_to_right"] == r["traces"]
        assert r["wrong_to_right"] == sum(row["r1"] == 0.0 for row in rows)
    assert load_tokenizer(final).vocab_size == load_tokenizer(cfg.model.path).vocab_size


def test_a_run_whose_every_round_keeps_no_trace_fails_without_a_final_model(tmp_path, capsys):
    cfg = sft_config(tmp_path, kind="star", iterations=2)  # the exact reward: an untrained model never scores
    with pytest.raises(RunFailed, match="no round of star kept a trace"):
        sft.run_sft(cfg, tmp_path / "run")
    assert capsys.readouterr().out.count("nothing trained") == 2
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "sft_data.json").exists()
    # the demo's pipeline check goes on with the model as it was, and records the empty rounds
    final = sft.run_sft(cfg, tmp_path / "demo_run", require_training=False)
    stats = json.loads((tmp_path / "demo_run" / "sft_data.json").read_text())
    assert [(r["traces"], r["steps"]) for r in stats["rounds"]] == [(0, 0), (0, 0)]
    base = from_pretrained(cfg.model.path).state_dict()
    assert all(torch.equal(v, base[k]) for k, v in from_pretrained(final).state_dict().items())


def test_score_sft_cli_runs_a_config_and_evaluates(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sft, "make_reward", lambda cfg: ParityReward())  # an untrained model scores
    cfg = sft_config(tmp_path, kind="pair_sft")
    cfg.data.eval = str(write_problems(tmp_path / "eval.jsonl", 4, "eval"))
    config = tmp_path / "sft.toml"
    config.write_text(to_toml(cfg))
    assert main(["sft", "--config", str(config), "--out", str(tmp_path / "run"), "--set", "sft.iterations=1"]) == 0
    out = capsys.readouterr().out
    assert "SFT (pair_sft)" in out and "final model:" in out
    assert json.loads((tmp_path / "run" / "eval_metrics.json").read_text())["n"] == 4
    # a second run into the same folder is refused before any work
    assert main(["sft", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_sft_config_keys_are_checked(tmp_path, capsys):
    cfg = sft_config(tmp_path)
    config = tmp_path / "sft.toml"
    config.write_text(to_toml(cfg) + "")
    for bad, message in (
        ("sft.kind=rft", "sft.kind must be one of"),
        ("sft.batch_size=0", "sft.batch_size must be > 0"),
    ):
        assert main(["sft", "--config", str(config), "--out", str(tmp_path / "x"), "--set", bad]) == 2
        assert message in capsys.readouterr().err
    assert cfg.sft.rounds == 3 and sft_config(tmp_path, kind="pair_sft").sft.rounds == 1
