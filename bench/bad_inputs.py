"""The careless and hostile user, counted: every bad input below goes to `score train`, `score eval`,
`score sft` or `score demo` on the tiny task, and each outcome is classed as a clear error (exit 2,
or exit 1 for a run that trained nothing, with one stderr line), a traceback, or silently accepted
(exit 0).

    python bench/bad_inputs.py            # prints the table per kind of input and the totals

Every case is expected to end as a clear error; the totals go to bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after site-packages: see pyproject's pytest options

from safetensors.torch import load_file, save_file  # noqa: E402

from score.rl.cli import main  # noqa: E402
from score.rl.demo import to_toml  # noqa: E402
from tests.helpers.tiny_run import edit_json, make_base, tiny_config, write_problems  # noqa: E402


def fresh(root: Path) -> tuple[Path, Path, Path]:
    """(config, model folder, eval file) of a new tiny run under `root`."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    make_base(root)
    cfg = tiny_config(root)
    cfg.data.eval = str(write_problems(root / "eval.jsonl", 3, "eval"))
    config = root / "run.toml"
    config.write_text(to_toml(cfg))
    return config, root / "base", root / "eval.jsonl"


def train(c, out, *extra):
    return ["train", "--config", str(c), "--out", str(out), *extra]


def cases():
    """(kind, name, setup(root) -> argv)."""
    config_keys = [
        ("optim.lr=-1", "negative lr"),
        ("optim.lr=nan", "NaN lr"),
        ("rollout.samples_per_prompt=1", "k = 1"),
        ("score.stage1_steps=-3", "negative steps"),
        ("reward.kind=fuzzy", "unknown reward"),
        ("optim.nope=1", "unknown key"),
        ("nope.key=1", "unknown section"),
        ("run.seed=18446744073709551616", "seed 2**64"),
        ("rollout.max_tokens_attempt1=100000", "budget past positions"),
        ("score.attempts=3", "attempts 3 with sequence_mean", "score.normalization=sequence_mean"),
        ("data.train=missing.jsonl", "missing data file"),
        ("model.path=/nonexistent", "missing model"),
    ]
    for key, name, *more in config_keys:
        extra = [x for k in (key, *more) for x in ("--set", k)]
        yield "config value", name, lambda r, e=extra: train(fresh(r)[0], r / "run", *e)

    def model_case(**change):
        def setup(r):
            c, base, _ = fresh(r)
            edit_json(base / "config.json", **change)
            return train(c, r / "run")

        return setup

    for name, change in [
        ("eos_token_id as a string", {"eos_token_id": "1"}),
        ("no max_position_embeddings", {"max_position_embeddings": None}),
        ("no hidden_size", {"hidden_size": None}),
        ("string num_key_value_heads", {"num_key_value_heads": "2"}),
        ("string rms_norm_eps", {"rms_norm_eps": "1e-6"}),
        ("bos id outside the vocab", {"bos_token_id": 99999}),
        ("vocab smaller than the tokenizer", {"vocab_size": 100}),
        ("unsupported architecture", {"architectures": ["MistralForCausalLM"]}),
    ]:
        yield "model config.json", name, model_case(**change)

    def file_case(name, content):
        def setup(r):
            c, base, _ = fresh(r)
            (base / name).write_bytes(content)
            return train(c, r / "run")

        return setup

    for name, content in [
        ("model.safetensors", b""),
        ("model.safetensors", b"\x01\x02\x03"),
        ("model.safetensors", b"\xff" * 64),
        ("tokenizer.json", b'{"version": "1.0", "model": '),
        ("tokenizer.json", b""),
        ("config.json", b"{not json"),
    ]:
        yield "model files", f"garbled {name} ({len(content)} bytes)", file_case(name, content)

    def no_tokenizer_config(r):
        c, base, _ = fresh(r)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            (base / name).unlink(missing_ok=True)
        return train(c, r / "run")

    yield "model files", "no tokenizer_config.json", no_tokenizer_config

    def nan_weights(r):
        c, base, _ = fresh(r)
        w = load_file(str(base / "model.safetensors"))
        first = sorted(w)[0]
        w[first][0] = float("nan")
        save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
        return train(c, r / "run")

    yield "model files", "NaN weights (train)", nan_weights

    def nan_weights_eval(r):
        c, base, ev = fresh(r)
        nan_weights(r)
        return ["eval", "--model", str(base), "--data", str(ev), "--config", str(c), "--out", str(r / "e")]

    yield "model files", "NaN weights (eval)", nan_weights_eval

    def data_case(lines_of):
        def setup(r):
            c, _, _ = fresh(r)
            f = r / "train.jsonl"
            f.write_bytes(lines_of(f.read_bytes()))
            return train(c, r / "run")

        return setup

    long = json.dumps({"id": "long", "problem": "last digit of " + "+".join(["7"] * 200), "answer": "0"}).encode()
    for name, fn in [
        ("over-long problem", lambda b: b + long + b"\n"),
        ("non-UTF-8 byte", lambda b: b + b'{"id": "u", "problem": "\xff", "answer": "1"}\n'),
        ("invalid JSON line", lambda b: b + b"{oops\n"),
        ("duplicate id", lambda b: b + b.splitlines()[0] + b"\n"),
        ("missing answer", lambda b: b + b'{"id": "m", "problem": "x"}\n'),
        ("empty file", lambda b: b""),
        ("a JSON list line", lambda b: b + b"[1, 2]\n"),
    ]:
        yield "training data", name, data_case(fn)

    def bad_eval(r):
        c, _, _ = fresh(r)
        (r / "eval.jsonl").write_text('{"id": "a", "problem": "x", "answer": "1"}\nnot json\n')
        return train(c, r / "run")

    yield "training data", "bad data.eval (read before training)", bad_eval

    def non_utf8_config(r):
        c, _, _ = fresh(r)
        c.write_bytes(c.read_bytes() + b"\n# caf\xff\n")
        return train(c, r / "run")

    yield "config file", "non-UTF-8 byte", non_utf8_config

    def bad_toml(r):
        c, _, _ = fresh(r)
        c.write_text(c.read_text() + "\n[optim\n")
        return train(c, r / "run")

    yield "config file", "invalid TOML", bad_toml

    def out_under_file(cmd):
        def setup(r):
            c, base, ev = fresh(r)
            (r / "file").write_text("x")
            out = r / "file" / "out"
            return {
                "train": train(c, out),
                "eval": ["eval", "--model", str(base), "--data", str(ev), "--config", str(c), "--out", str(out)],
                "sft": ["sft", "--config", str(c), "--out", str(out)],
                "demo": ["demo", "--quick", "--out", str(out)],
            }[cmd]

        return setup

    for cmd in ("train", "eval", "sft", "demo"):
        yield "output folder", f"--out under a regular file ({cmd})", out_under_file(cmd)

    def eval_out_is_file(r):
        c, base, ev = fresh(r)
        (r / "f").write_text("x")
        return ["eval", "--model", str(base), "--data", str(ev), "--config", str(c), "--out", str(r / "f")]

    yield "output folder", "score eval --out FILE", eval_out_is_file

    def resume_changed(key):
        def setup(r):
            c, _, _ = fresh(r)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                main(train(c, r / "run", "--max-steps", "2"))
            return train(c, r / "run", "--resume", "--set", key)

        return setup

    for key in ("optim.lr=0.5", "score.stage1_steps=1", "score.alpha=0"):
        yield "resume", f"--resume with {key}", resume_changed(key)

    def resume_other_model(r):
        c, base, _ = fresh(r)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(train(c, r / "run", "--max-steps", "2"))
        edit_json(base / "config.json", rms_norm_eps=1e-5)
        return train(c, r / "run", "--resume")

    yield "resume", "--resume with another base model", resume_other_model

    def demo_other_seed(r):
        r.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(["demo", "--quick", "--seeds", "1", "--workers", "1", "--out", str(r / "d")])
        return ["demo", "--quick", "--seed", "3", "--out", str(r / "d")]

    yield "demo", "into another seed's demo", demo_other_seed
    yield "demo", "--seed 2**64", lambda r: ["demo", "--quick", "--seed", str(2**64), "--out", str(r / "d")]


def run_case(argv) -> str:
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except Exception as e:  # noqa: BLE001 - a traceback is what this counts
        return f"traceback ({type(e).__name__}: {str(e)[:80]})"
    if code == 0:
        return "silently accepted"
    lines = [line for line in err.getvalue().strip().splitlines() if line]
    return "clear error" if lines and code in (1, 2) else f"exit {code} without a message"


def main_sweep() -> int:
    tally: dict[str, Counter] = {}
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    for i, (kind, name, setup) in enumerate(cases()):
        outcome = run_case(setup(root / f"case{i}"))
        tally.setdefault(kind, Counter())[outcome.split(" (")[0]] += 1
        print(f"{kind:18s} | {name:42s} | {outcome}", flush=True)
    print("\n| kind of input | cases | clear error | traceback | silently accepted |\n|---|---|---|---|---|")
    total = Counter()
    for kind, counts in tally.items():
        total.update(counts)
        n = sum(counts.values())
        print(f"| {kind} | {n} | {counts['clear error']} | {counts['traceback']} | {counts['silently accepted']} |")
    n = sum(total.values())
    print(f"| all | {n} | {total['clear error']} | {total['traceback']} | {total['silently accepted']} |")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if total["clear error"] == n else 1


if __name__ == "__main__":
    sys.exit(main_sweep())
