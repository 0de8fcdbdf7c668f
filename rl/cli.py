"""The `score` command line: `train`, `sft`, `eval`, `demo`, `data` and `convert`.

    score train --config FILE --out DIR [--max-steps N] [--set section.key=value ...] [--resume] [--nproc G]
                [--nnodes N --node-rank R --master-addr A --master-port P]    # on each of N nodes
    torchrun --nproc_per_node=G -m score.rl.cli train --config FILE --out DIR ...   # same as --nproc G
    score train --describe                     # every config key with its default and meaning
    score sft   --config FILE --out DIR [--set section.key=value ...] [--resume]   # STaR / Pair-SFT ([sft])
    score eval  --model PATH --data FILE --out DIR [--config FILE] [--set ...] [--max-problems N]
                [--attempts N | --first-attempts FILE | --scaling 1,2,4,8,16 | --self-refine]
    score demo  --out DIR [--setting recall|guess] [--ablations] [--baselines] [--quick] [--seed N] [--seeds K]
                [--workers W]
    score data math --train SRC --test SRC --math500 SRC --out DIR   # the paper's MATH splits
    score convert gguf SRC --out DIR [--dtype float32|bfloat16|float16]

Errors in the user's input (config, data, paths) and refusals of the machine (disk full, read-only
folder) are printed as one line naming the cause and exit with status 2; a run that trained nothing
(every step skipped) exits 1; anything else is a bug and keeps its traceback. Every command that
writes a folder holds it (run_lock.py) until it returns; a folder another process holds is refused.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="score", description="SCoRe self-correction RL trainer")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="run Stage I and Stage II from a TOML config")
    train.add_argument("--config", help="run configuration (TOML)")
    train.add_argument("--out", help="run folder: metrics.jsonl, checkpoints/, final/, plots/")
    train.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps in all")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax; repeatable)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue although the config or the model/data files differ from the run's (listed)",
    )
    train.add_argument("--describe", action="store_true", help="print every config key with its default and exit")
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="G",
        help="train on G processes (GPUs) per node with FSDP2: starts torchrun with this command line",
    )
    for flag, metavar, what in (
        ("--nnodes", "N", "nodes in the job (run the same command on each, with its own --node-rank)"),
        ("--node-rank", "R", "this node's rank in [0, N)"),
        ("--master-addr", "A", "node 0's host name or address"),
        ("--master-port", "P", "a free port on node 0 for the rendezvous"),
    ):
        train.add_argument(flag, default=None, metavar=metavar, help=what)

    sft = sub.add_parser("sft", help="a supervised self-correction baseline (STaR, Pair-SFT) from a TOML config")
    sft.add_argument("--config", required=True, help="run configuration (TOML; the [sft] section picks the baseline)")
    sft.add_argument("--out", required=True, help="run folder: data/, metrics.jsonl, sft_data.json, final/")
    sft.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    sft.add_argument(
        "--resume",
        action="store_true",
        help="after a kill: start the run in --out again from round 0 (sft keeps no checkpoints inside a run)",
    )
    sft.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: go on although the config or the model/data files differ from the run's (listed)",
    )

    ev = sub.add_parser("eval", help="greedy two-attempt evaluation of a model")
    ev.add_argument("--model", required=True, help="HF-format model folder, or a Hub id ORG/NAME[@REVISION]")
    ev.add_argument("--data", required=True, help="problems (JSONL; 'humaneval' with reward.kind = code)")
    ev.add_argument("--out", required=True, help="folder for eval.jsonl and eval_metrics.json")
    ev.add_argument("--config", default=None, help="take prompt/reward/data-field settings from this run config")
    ev.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    ev.add_argument("--max-problems", type=int, default=0, help="evaluate only the first N problems (0 = all)")
    study = ev.add_mutually_exclusive_group()
    study.add_argument(
        "--attempts", type=int, default=2, help="greedy attempts per problem (> 2 repeats the instruction; default 2)"
    )
    study.add_argument(
        "--first-attempts",
        default=None,
        metavar="FILE",
        help="JSONL of {'id', 'attempt1'} rows (e.g. another model's eval.jsonl): grade the model's "
        "correction of those first attempts",
    )
    study.add_argument(
        "--scaling",
        default=None,
        metavar="B1,B2,...",
        help="inference-compute scaling: majority vote over B samples vs B/2 samples + one correction, "
        "sampled at --temperature; writes scaling.json and plots/scaling.png",
    )
    study.add_argument(
        "--self-refine",
        action="store_true",
        help="the Self-Refine prompting baseline: attempt 2 follows the model's own critique of attempt 1 "
        "([self_refine] section: critique/refine instructions, critique budget)",
    )
    ev.add_argument("--temperature", type=float, default=None, help="sampling temperature of --scaling (default 0.7)")
    ev.add_argument("--seed", type=int, default=None, help="sampling seed of --scaling (default 0)")

    for command in (train, sft, ev):
        command.add_argument("--quiet", action="store_true", help="no progress output (= --set run.progress=false)")

    demo = sub.add_parser("demo", help="the embedded CPU demo: warm-up, base eval, SCoRe, eval, table")
    demo.add_argument("--out", required=True, help="demo folder (results.json, eval_*.jsonl, plots)")
    demo.add_argument(
        "--ablations",
        action="store_true",
        help="also run multi-turn RL and the paper's ablations (single-turn RL, no Stage I, no reward shaping, "
        "STaR in Stage II, no online turn-1 samples), each with every seed",
    )
    demo.add_argument(
        "--setting",
        choices=("recall", "guess"),
        default="recall",
        help="recall (default): RL trains on 32 problems the base model half-remembers, so attempt 1 can be "
        "learned there and multi-turn RL can collapse; guess: 4,000 training problems, attempt 1 a guess on each",
    )
    demo.add_argument(
        "--baselines",
        action="store_true",
        help="also run the paper's baselines: Self-Refine prompting, STaR and Pair-SFT (each with and without "
        "correct-to-correct data), the SFT ones with every seed",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress output, only the results")
    demo.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in seconds, not the result")
    demo.add_argument("--seed", type=int, default=0, help="seed of the task data and warm-up; RL seeds are SEED..")
    demo.add_argument("--seeds", type=int, default=None, help="RL seeds per method (default 3; --quick 2)")
    demo.add_argument(
        "--workers",
        type=int,
        default=None,
        help="RL runs at once, one process and one thread each (default: 2, or 1 on one core)",
    )

    data = sub.add_parser("data", help="build a task's data files from your own copies of the datasets")
    recipes = data.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    math = recipes.add_parser("math", help="the paper's MATH splits: train + test minus MATH500, and MATH500")
    for flag, what in (("--train", "MATH train"), ("--test", "MATH test"), ("--math500", "MATH500")):
        math.add_argument(flag, required=True, help=f"{what}: JSONL, Parquet, hf:NAME[@SPLIT] or a Hub dataset id")
    math.add_argument("--out", required=True, help="folder for math_train.jsonl and math500.jsonl")

    convert = sub.add_parser("convert", help="convert a checkpoint from another format into an HF folder")
    formats = convert.add_subparsers(dest="format", metavar="FORMAT", required=True)
    gguf = formats.add_parser("gguf", help="a llama.cpp / Ollama GGUF file (needs the gguf extra)")
    gguf.add_argument("src", help="the .gguf file")
    gguf.add_argument("--out", required=True, help="new folder for model.safetensors, config.json, tokenizer files")
    gguf.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype of the written weights"
    )
    return parser


def _train(args) -> int:
    from .config import describe_config, load_config

    if args.describe:
        print(describe_config())
        return 0
    if not args.config or not args.out:
        raise ValueError("score train needs --config FILE and --out DIR")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    cfg = load_config(args.config, args.set)
    from .trainer import train

    if args.allow_config_change and not args.resume:
        raise ValueError("--allow-config-change only applies with --resume")
    final = train(
        cfg, args.out, max_steps=args.max_steps, resume=args.resume, allow_config_change=args.allow_config_change
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"final policy: {final}")
    return 0


def _eval(args) -> int:
    from .config import config_with_overrides, load_config

    if args.max_problems < 0:
        raise ValueError(f"--max-problems must be >= 0, got {args.max_problems}")
    if args.attempts < 2:
        raise ValueError(f"--attempts must be >= 2, got {args.attempts}")
    if args.scaling is None:
        for flag, value in (("--temperature", args.temperature), ("--seed", args.seed)):
            if value is not None:
                raise ValueError(f"{flag} sets the sampling of --scaling; without it the evaluation is greedy")
    args.temperature = 0.7 if args.temperature is None else args.temperature
    args.seed = 0 if args.seed is None else args.seed
    if not 0 <= args.seed < 2**31:
        raise ValueError(f"--seed must be in [0, 2**31), got {args.seed}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature}")
    from .scaling import parse_budgets

    budgets = parse_budgets(args.scaling) if args.scaling is not None else None
    from score.model.hub import resolve_model_path

    args.model = resolve_model_path(args.model)  # a folder, or the snapshot of a Hub id
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: not a folder")
    if args.config:
        cfg = load_config(args.config, args.set)
    else:
        from score.model import load_tokenizer

        chat = load_tokenizer(args.model).chat_template is not None
        cfg = config_with_overrides({"prompt": {"chat": chat}}, args.set, source="score eval")
    cfg.model.path = args.model
    cfg.data.eval = args.data
    if budgets and cfg.reward.kind == "code":
        raise ValueError(
            "--scaling votes over extracted answers; reward.kind = 'code' has programs, not answers, to vote over"
        )

    from score.model import from_pretrained
    from score.model.files import write_json, write_jsonl

    from .evaluate import evaluate, evaluate_given_first_attempts, evaluate_self_refine, read_first_attempts, table
    from .factories import (
        load_problems,
        make_engine,
        make_reward,
        pick_device,
        self_refine_builders,
    )
    from .plots import plot_attempts, plot_scaling
    from .precision import Precision
    from .preflight import check_eval_room, check_finite, check_wandb
    from .run_inputs import model_inputs
    from .run_lock import claim_folder
    from .scaling import inference_scaling, scaling_table

    problems = load_problems(cfg, args.data)
    if args.max_problems:
        problems = problems[: args.max_problems]
    given = read_first_attempts(args.first_attempts, problems) if args.first_attempts else None
    inputs = model_inputs(cfg, args.model)
    config, tokenizer, builder = inputs.model_config, inputs.tokenizer, inputs.builder
    turns = self_refine_builders(cfg, builder) if args.self_refine else None
    check_eval_room(
        cfg,
        builder,
        [p for p, _ in given] if given else problems,
        config.max_position_embeddings,
        f"--first-attempts {args.first_attempts}" if given else f"--data {args.data}",
        attempts=args.attempts,
        turns=turns,
        given={p.id: len(tokenizer.encode(text)) for p, text in given} if given else None,
    )
    check_wandb(cfg)
    out = claim_folder(args.out).folder  # held until the command ends (main)
    precision = Precision.of(cfg, pick_device(cfg.model.device))
    # no training here: the weights are loaded straight in the compute dtype
    model = from_pretrained(args.model, dtype=precision.compute_dtype, device=precision.device)
    model.set_kernels(precision.kernels)
    check_finite(model, args.model)
    engine, reward = make_engine(cfg, model), make_reward(cfg)
    name = Path(args.model).name or "model"
    try:
        if budgets:
            scaling = inference_scaling(
                engine,
                builder,
                problems,
                reward,
                budgets=budgets,
                temperature=args.temperature,
                token_budgets=cfg.eval_budgets,
                seed=args.seed,
                progress=cfg.run.progress,
            )
            write_json(out / "scaling.json", scaling)
            plot_scaling(scaling, out / "plots")
            print(scaling_table(scaling))
            curve = zip(scaling["budgets"], scaling["parallel"], scaling["sequential"], strict=True)
            _eval_to_wandb(
                cfg,
                out,
                args,
                summary={"scaling": {k: v for k, v in scaling.items() if not isinstance(v, list)}},
                history=[(b, {"scaling": {"parallel": par, "sequential": seq}}) for b, par, seq in curve],
            )
            return 0
        if args.self_refine:
            metrics, records = evaluate_self_refine(
                engine,
                builder,
                turns,
                problems,
                reward,
                budgets=cfg.eval_budgets,
                critique_budget=cfg.self_refine.max_tokens_critique,
            )
        elif given:
            metrics, records = evaluate_given_first_attempts(engine, builder, given, reward, budget=cfg.eval_budgets[1])
        else:
            metrics, records = evaluate(
                engine,
                builder,
                problems,
                reward,
                budgets=cfg.eval_budgets,
                attempts=args.attempts,
                progress=cfg.run.progress,
            )
    finally:
        reward.close()
    write_jsonl(out / "eval.jsonl", records)
    write_json(out / "eval_metrics.json", metrics)
    if args.attempts > 2:
        plot_attempts(metrics, out / "plots")
        print(
            "accuracy per attempt: "
            + ", ".join(f"t{i}: {100 * a:.1f}" for i, a in enumerate(metrics["acc_per_attempt"], 1))
        )
    print(table({name: metrics}))
    per_attempt = enumerate(metrics.get("acc_per_attempt", []), 1)
    _eval_to_wandb(
        cfg,
        out,
        args,
        summary={"eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}},
        history=[(attempt, {"eval": {"acc": acc}}) for attempt, acc in per_attempt],
    )
    return 0


def _eval_to_wandb(cfg, out: Path, args, *, summary: dict, history: list) -> None:
    """With run.wandb: the evaluation as one Weights & Biases run (config: the run config and the
    command's arguments; summary: its figures; history: a curve by attempt or by sample budget)."""
    if not cfg.run.wandb:
        return
    from .run_log import log_finished_run
    from .trainer import wandb_settings

    settings = wandb_settings(cfg, out)
    command = {k: v for k, v in vars(args).items() if k in EVAL_ARGS and v is not None}
    log_finished_run(
        out, **{**settings, "config": {**settings["config"], "score_eval": command}}, summary=summary, history=history
    )


EVAL_ARGS = (
    "model",
    "data",
    "max_problems",
    "attempts",
    "first_attempts",
    "scaling",
    "self_refine",
    "temperature",
    "seed",
)


def _sft(args) -> int:
    from .config import load_config
    from .sft import run_sft

    if args.allow_config_change and not args.resume:
        raise ValueError("--allow-config-change only applies with --resume")
    cfg = load_config(args.config, args.set)
    final = run_sft(cfg, args.out, resume=args.resume, allow_config_change=args.allow_config_change)
    print(f"final model: {final}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(
        args.out,
        ablations=args.ablations,
        baselines=args.baselines,
        quick=args.quick,
        seed=args.seed,
        seeds=args.seeds,
        workers=args.workers,
        progress=not args.quiet,  # a bar on a terminal, a few lines in a log (rl/progress.py)
        setting=args.setting,
    )
    return 0


def _data(args) -> int:
    from .math_data import math_splits, write_math_splits
    from .run_lock import claim_folder

    splits = math_splits(args.train, args.test, args.math500)
    out = claim_folder(args.out).folder  # held until the command ends (main)
    counts = write_math_splits(splits, out)
    print(
        f"MATH500: {counts['math500']} of {counts['math500']} found in the test set; training: "
        f"{counts['train']} train + {counts['test_kept']} test = {counts['training']} "
        f"problems -> {out / 'math_train.jsonl'}, {out / 'math500.jsonl'}"
    )
    return 0


def _convert(args) -> int:
    import torch

    from score.model.gguf import convert_gguf

    from .run_lock import claim_folder

    # The folder is held from just before the first write to the command's end (main).
    out = convert_gguf(args.src, args.out, dtype=getattr(torch, args.dtype), claim=claim_folder)
    print(f"converted {args.src} -> {out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("-h", "--help"):
        from .extras import train_extra_error

        missing = train_extra_error()
        if missing:
            print(f"score: error: {missing}", file=sys.stderr)
            return 2
    if argv[:1] == ["train"]:  # `score train --nproc G [--nnodes N ...]` = torchrun over the same command line
        from .parallel.launch import launch, split_launch

        try:
            where, rest = split_launch(argv)
        except ValueError as e:
            print(f"score train: error: {e}", file=sys.stderr)
            return 2
        if where is not None:
            return launch(where, rest)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False) and hasattr(args, "set"):
        args.set = [*args.set, "run.progress=false"]
    if args.command is None:
        parser.print_help()
        return 0
    handler = {"train": _train, "sft": _sft, "eval": _eval, "data": _data, "demo": _demo, "convert": _convert}[
        args.command
    ]
    from .run_lock import command_scope
    from .trainer import RunFailed

    try:
        with command_scope():  # the folders a command claims are let go when it ends
            code = handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"score {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except RunFailed as e:
        print(f"score {args.command}: failed: {e}", file=sys.stderr)
        code = 1
    except OSError as e:  # the machine refused a write or read: disk full, read-only, not a directory
        where = f": {e.filename}" if e.filename else ""
        print(f"score {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        code = 2
    if args.command == "train":
        from .parallel.distributed import exit_rank, launched_by_torchrun

        if launched_by_torchrun():
            exit_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
