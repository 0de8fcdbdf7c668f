"""How far the weights move under each precision setting: the measurement behind rl/precision.py.

    python bench/precision_weight_movement.py --base runs/demo/base [--steps 20] [--lr 2e-5]

Runs `--steps` Stage I SCoRe steps of the demo's run config (configs/demo.toml: the demo's task,
budgets and batch) from the demo's base model, once per setting, and reports per setting the
share of weights that changed at all and the mean |change| against the base (for bf16 master
weights, against the base rounded to bf16, their own starting point):

- fp32 masters, fp32 compute (autocast off): the CPU default;
- fp32 masters, bf16 compute (model.autocast = "bf16"): the GPU default, run on the CPU;
- bf16 masters (model.master_dtype = "bfloat16"): what the shipped GPU configs did before.

One thread, so the numbers do not depend on the machine's core count (they do on its float
rounding: compare settings within one run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from score.rl.config import load_config
from score.rl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "fp32 masters, fp32 compute": ["model.autocast=off"],
    "fp32 masters, bf16 compute": ["model.autocast=bf16"],
    "bf16 masters": ["model.master_dtype=bfloat16", "model.autocast=off"],
}


def movement(base: Path, steps: int, lr: float, overrides: list[str], out: Path) -> dict:
    data = base.parent / "data"
    cfg = load_config(
        ROOT / "configs" / "demo.toml",
        [
            f'model.path="{base}"',
            f'data.train="{data / "train.jsonl"}"',
            'data.eval=""',
            f"optim.lr={lr}",
            f"score.stage1_steps={steps}",
            "score.stage2_steps=0",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, out)
    try:
        start = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
        trainer.fit()
        end = trainer.policy.state_dict()
    finally:
        trainer.close()
    changed = total = 0
    moved = 0.0
    for name, before in start.items():
        delta = (end[name].double() - before.double()).abs()
        changed += int((delta > 0).sum())
        total += delta.numel()
        moved += float(delta.sum())
    return {
        "changed_share": changed / total,
        "mean_abs_change": moved / total,
        "dtype": str(next(iter(end.values())).dtype),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the demo's base model folder (runs/demo/base)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = Path(args.base).resolve()
    if not (base / "config.json").is_file() or not (base.parent / "data" / "train.jsonl").is_file():
        raise SystemExit(f"{base}: not a demo base model folder (run `score demo --out DIR` and pass DIR/base)")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for i, (name, overrides) in enumerate(SETTINGS.items()):
            results[name] = movement(base, args.steps, args.lr, overrides, Path(scratch) / f"run{i}")
            r = results[name]
            print(f"{name:28s} changed {r['changed_share']:6.1%}  mean |dw| {r['mean_abs_change']:.3g}  ({r['dtype']})")
    reference = results["fp32 masters, fp32 compute"]["mean_abs_change"]
    for name, r in results.items():
        print(f"{name:28s} mean |dw| x{r['mean_abs_change'] / reference:.2f} of fp32's")
    print(json.dumps({"steps": args.steps, "lr": args.lr, **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
