"""The search for a demo setting where multi-turn RL collapses (probes, one process, one thread).

    python bench/collapse_search.py base --out runs/search/b1 --mix '{"worked": 0.15, "recall": 0.3}' \
        --train 128 --warmup-steps 800
    python bench/collapse_search.py rl --base runs/search/b1 --method multi_turn_rl --steps 0 150 --seed 0

`base` warms a base model up with a WarmupMix and writes what each answer path gives on the training
and held-out problems, greedy and sampled (`probe.json`); `rl` trains one method from it and
evaluates greedily on both sets, appending a line to `runs/search/results.jsonl` beside the base.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from score.model import save_pretrained
from score.rl.demo import task as demo_task
from score.rl.demo.base_model import build_model, build_tokenizer, warm_up, write_problems
from score.rl.demo.measure import headroom
from score.rl.demo.settings import METHODS, DemoSizes, demo_config
from score.rl.evaluate import evaluate
from score.rl.factories import load_problems, make_engine, make_reward, prompt_builder
from score.rl.trainer import Trainer

EXTRA_METHODS = {"multi_turn_rl": ("multi-turn RL", {"stage1_steps": 0, "alpha": 0.0})}


def kind_of(text: str, first_answer: str | None, answer: str | None) -> str:
    if text.startswith(demo_task.WORKED_PREFIX):
        return "worked"
    if answer is None:
        return "other"
    return "restate" if answer == first_answer else "changed"


def sampled_probe(model, builder, problems, cfg, k: int = 4, seed: int = 1234) -> dict:
    """Sampled (temperature 1) two-attempt behaviour of `model` on `problems`."""
    from score.rl.rewards.math_reward import extract_final_answer
    from score.rl.rollout import RolloutSpec, run_rollout

    reward = make_reward(cfg)
    try:
        spec = RolloutSpec.from_config(cfg.rollout, k=k, temperature=1.0, top_p=1.0, top_k=0, seed=seed)
        trajs, _ = run_rollout(make_engine(cfg, model), builder, problems, reward, spec)
    finally:
        reward.close()
    kinds = {"worked": 0, "restate": 0, "changed": 0, "other": 0}
    worked_right = 0
    for t in trajs:
        first, second = t.attempts[0], t.attempts[1]
        kind = kind_of(second.text, extract_final_answer(first.text), extract_final_answer(second.text))
        kinds[kind] += 1
        worked_right += kind == "worked" and second.reward == 1.0
    n = len(trajs)
    return {
        "acc_t1": sum(t.attempts[0].reward for t in trajs) / n,
        "acc_t2": sum(t.attempts[1].reward for t in trajs) / n,
        **{f"a2_{k}": v / n for k, v in kinds.items()},
        "worked_acc": worked_right / max(1, kinds["worked"]),
    }


def greedy_probe(model, builder, problems, cfg) -> dict:
    room, _ = headroom(model, builder, problems, cfg)
    reward = make_reward(cfg)
    try:
        metrics, records = evaluate(make_engine(cfg, model), builder, problems, reward, budgets=cfg.eval_budgets)
    finally:
        reward.close()
    worked = sum(r["attempt2"].startswith(demo_task.WORKED_PREFIX) for r in records) / len(records)
    keys = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "changed_frac")
    return {"direct": room["direct"], "worked": room["worked"], **{k: metrics[k] for k in keys}, "a2_worked": worked}


def cmd_base(args) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = demo_task.WarmupMix(**json.loads(args.mix))
    sizes = DemoSizes(warmup_steps=args.warmup_steps, rl_train_problems=args.train)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    base_dir, train_file, eval_file = out / "base", out / "data" / "train.jsonl", out / "data" / "eval.jsonl"
    cfg = demo_config(base_dir, train_file, eval_file, args.seed, False)
    tokenizer = build_tokenizer(sizes.vocab, args.seed)
    builder = prompt_builder(cfg, tokenizer)
    model = build_model(tokenizer, sizes)
    train = demo_task.problems(sizes.rl_train_problems, "train", args.seed)
    recall = tuple(tuple(p.meta["operands"]) for p in train)
    loss = warm_up(model, builder, sizes, args.seed, False, mix, recall)
    save_pretrained(model, base_dir)
    tokenizer.save_pretrained(base_dir)
    write_problems(train_file, train)
    write_problems(eval_file, demo_task.problems(sizes.eval_problems, "eval", args.seed))
    warm_s = time.perf_counter() - started
    eval_set = load_problems(cfg, str(eval_file))
    train_set = load_problems(cfg, str(train_file))[:256]
    probe = {
        "mix": json.loads(args.mix),
        "train": args.train,
        "warmup_steps": args.warmup_steps,
        "seed": args.seed,
        "warmup_loss": loss,
        "warmup_s": warm_s,
        "greedy_train": greedy_probe(model, builder, train_set, cfg),
        "greedy_eval": greedy_probe(model, builder, eval_set, cfg),
        "sampled_train": sampled_probe(model, builder, train_set, cfg),
        "sampled_eval": sampled_probe(model, builder, eval_set, cfg),
    }
    (out / "probe.json").write_text(json.dumps(probe, indent=1))
    print(json.dumps(probe, indent=1))


class ProbeTrainer(Trainer):
    """The trainer, logging what attempt 2 does at each step (worked / restated / changed)."""

    def _metrics(self, trajectories, rollout, stage, lr, totals):
        from score.rl.rewards.math_reward import extract_final_answer

        m = super()._metrics(trajectories, rollout, stage, lr, totals)
        texts = [(t.attempts[0].text, t.attempts[1].text) for t in trajectories]
        kinds = [kind_of(two, extract_final_answer(one), extract_final_answer(two)) for one, two in texts]
        for kind in ("worked", "restate", "changed"):
            m[f"a2_{kind}"] = kinds.count(kind) / len(kinds)
        return m


def cmd_rl(args) -> None:
    torch.set_num_threads(1)
    base = Path(args.base)
    methods = {**METHODS, **EXTRA_METHODS}
    overrides = dict(methods[args.method][1])
    stage1, stage2 = args.steps
    score = {"stage1_steps": stage1, "stage2_steps": stage2, **overrides}
    if overrides.get("stage1_steps") == 0:
        score["stage2_steps"] = stage1 + stage2
    # The search ran with 16 prompts per step; `--set` changes it (the recall setting takes 32).
    data = (base / "base", base / "data" / "train.jsonl", base / "data" / "eval.jsonl")
    cfg = demo_config(*data, args.seed, False, prompts_per_step=16, **score)
    for key, value in json.loads(args.set).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    run_dir = base / "runs" / f"{args.tag or args.method}_seed{args.seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    started = time.perf_counter()
    trainer = ProbeTrainer(cfg, run_dir)
    try:
        trainer.fit()
        model = trainer.policy
        train_set = load_problems(cfg, cfg.data.train)[:256]
        eval_set = load_problems(cfg, cfg.data.eval)
        result = {
            "base": str(base),
            "method": args.method,
            "tag": args.tag,
            "seed": args.seed,
            "steps": args.steps,
            "set": json.loads(args.set),
            "rl_s": time.perf_counter() - started,
            "greedy_train": greedy_probe(model, trainer.builder, train_set, cfg),
            "greedy_eval": greedy_probe(model, trainer.builder, eval_set, cfg),
        }
    finally:
        trainer.close()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward_1", "reward_2", "changed_frac", "a2_worked", "a2_restate")
    every = max(1, len(lines) // 10)
    result["curve"] = [
        {"step": r["step"], **{k: round(r[k], 3) for k in keys if k in r}} for r in lines[every - 1 :: every]
    ]
    with open(base.parent / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items()}, indent=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base")
    b.add_argument("--out", required=True)
    b.add_argument("--mix", default="{}")
    b.add_argument("--train", type=int, default=4000)
    b.add_argument("--warmup-steps", type=int, default=800)
    b.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("rl")
    r.add_argument("--base", required=True)
    r.add_argument("--method", required=True)
    r.add_argument("--steps", type=int, nargs=2, default=(25, 75))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", default="{}")
    r.add_argument("--tag", default="")
    args = parser.parse_args()
    {"base": cmd_base, "rl": cmd_rl}[args.cmd](args)


if __name__ == "__main__":
    main()
