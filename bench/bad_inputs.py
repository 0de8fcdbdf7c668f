"""The careless and hostile user, counted: every bad input below goes to one `score` command (train,
sft, eval, demo, convert, data) on the tiny task, in this process, and each outcome is classed as

- clear: exit 2 (or 1 for a run that trained nothing) with one stderr line that names the cause (each
  case lists what it must name: the key, file, line or problem id) and nothing written where the
  case says nothing may be;
- vague: a one-line refusal that misses what it should name, more than one line, or a refusal that
  came after the output folder was written;
- traceback: an exception escaped the command;
- silent: exit 0, the bad input accepted.

    python bench/bad_inputs.py            # every case, then the table per command and per kind

Where the machine lets this process mount a small tmpfs (root in a container), the full-disk cases
fill a real file system; elsewhere safetensors' writer is made to fail as it does on a full disk.
Every case is expected to end as a clear error; the totals go to bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after site-packages: see pyproject's pytest options

from safetensors.torch import load_file, save_file  # noqa: E402

from score.rl.cli import main  # noqa: E402
from tests.helpers.tiny_run import edit_json, make_base, tiny_config, write_problems  # noqa: E402

COMMANDS = ("train", "sft", "eval", "demo", "convert", "data")
OUTCOMES = ("clear", "vague", "traceback", "silent")


@dataclass
class Case:
    command: str
    kind: str
    name: str
    setup: Callable  # Work -> argv
    expect: tuple = ()  # what the one error line must name
    env: dict = field(default_factory=dict)  # variables set (None: unset) while the command runs
    untouched: str | None = None  # a path under the case's root that a refusal must not create


class Work:
    """One case's folder: a tiny model, its config, problems, a GGUF file, all copied from a template."""

    def __init__(self, root: Path, template: Path):
        self.root = root
        shutil.copytree(template, root)
        self.config, self.base, self.eval = root / "run.toml", root / "base", root / "eval.jsonl"
        self.train_data, self.gguf = root / "train.jsonl", root / "m.gguf"
        self.cleanups: list[Callable] = []

    def toml(self, **overrides) -> Path:
        """The config with `section__key` overrides, written as a new file."""
        from score.rl.config import to_toml

        cfg = tiny_config(self.root, **overrides)
        path = self.root / f"run-{len(list(self.root.glob('run-*.toml')))}.toml"
        path.write_text(to_toml(cfg))
        return path

    def quietly(self, argv) -> int:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return main(argv)

    def full_disk(self, size: str) -> Path | None:
        """A tmpfs of `size` mounted at root/full, or None where mounting is not allowed."""
        mount = self.root / "full"
        mount.mkdir()
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
        if ok.returncode != 0:
            return None
        self.cleanups.append(lambda: subprocess.run(["umount", "-l", str(mount)], capture_output=True))
        return mount


def make_template(root: Path) -> Path:
    template = root / "template"
    template.mkdir(parents=True)
    make_base(template)
    cfg = tiny_config(template)
    cfg.data.eval = str(write_problems(template / "eval.jsonl", 3, "eval"))
    from score.rl.config import to_toml

    (template / "run.toml").write_text(to_toml(cfg))
    from tests.helpers.gguf_files import write_tiny_gguf

    write_tiny_gguf(template / "m.gguf", "F32")
    rows = [{"problem": f"problem {i}?", "solution": f"so \\boxed{{{i}}}"} for i in range(6)]
    for name, part in (("math_train", rows[:3]), ("math_test", rows[3:]), ("math500", rows[4:])):
        (template / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return template


def retarget(template: Path, root: Path) -> None:
    """Point the copied configs' paths from the template to this case's folder."""
    for f in root.glob("*.toml"):
        f.write_text(f.read_text().replace(str(template), str(root)))


# ---------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------
def train(w: Work, *extra, config=None):
    return ["train", "--config", str(config or w.config), "--out", str(w.root / "run"), *extra]


def sft(w: Work, *extra, config=None):
    return ["sft", "--config", str(config or w.config), "--out", str(w.root / "sft"), *extra]


def ev(w: Work, data=None):
    data = data or w.eval
    return ["eval", "--model", str(w.base), "--data", str(data), "--config", str(w.config), "--out", str(w.root / "e")]


def evx(*extra):
    """An eval case with extra flags."""
    return lambda w: [*ev(w), *extra]


def long_problem(w: Work, path: Path, problem_id="long-one") -> Path:
    row = {"id": problem_id, "problem": "last digit of " + "+".join(["7"] * 120), "answer": "0"}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return path


def nan_weights(w: Work):
    weights = load_file(str(w.base / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first][0] = float("nan")
    save_file(weights, str(w.base / "model.safetensors"), metadata={"format": "pt"})


def no_login():
    unset = {k: None for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE")}
    return unset | {"NETRC": "/nonexistent/netrc", "WANDB_CONFIG_DIR": "/nonexistent/wandb"}


def train_cases():
    # (override, name, what the error names): a value the config refuses names the --set item; one it
    # takes but the run cannot use names the key or the path.
    config_keys = [
        ("optim.lr=-1", "negative lr", ("--set optim.lr=-1",)),
        ("optim.lr=nan", "NaN lr", ("--set optim.lr=nan",)),
        ("rollout.samples_per_prompt=1", "k = 1", ("--set rollout.samples_per_prompt",)),
        ("score.stage1_steps=-3", "negative steps", ("--set score.stage1_steps",)),
        ("reward.kind=fuzzy", "unknown reward", ("--set reward.kind",)),
        ("optim.nope=1", "unknown key", ("--set optim.nope",)),
        ("nope.key=1", "unknown section", ("--set nope.key", "[nope]")),
        ("run.seed=18446744073709551616", "seed 2**64", ("--set run.seed",)),
        ("rollout.max_tokens_attempt1=100000", "budget past positions", ("rollout.max_tokens_attempt1",)),
        ("data.train=missing.jsonl", "missing data file", ("missing.jsonl",)),
        ("model.path=/nonexistent", "missing model", ("/nonexistent",)),
    ]
    for key, name, named in config_keys:
        yield Case("train", "config value", name, lambda w, k=key: train(w, "--set", k), named)
    yield Case(
        "train",
        "config value",
        "attempts 3 with sequence_mean",
        lambda w: train(w, "--set", "score.attempts=3", "--set", "score.normalization=sequence_mean"),
        ("score.normalization",),
    )

    def model_case(**change):
        def setup(w):
            edit_json(w.base / "config.json", **change)
            return train(w)

        return setup

    for name, change, named in [
        ("eos_token_id as a string", {"eos_token_id": "1"}, "eos_token_id"),
        ("no max_position_embeddings", {"max_position_embeddings": None}, "max_position_embeddings"),
        ("no hidden_size", {"hidden_size": None}, "hidden_size"),
        ("string num_key_value_heads", {"num_key_value_heads": "2"}, "num_key_value_heads"),
        ("string rms_norm_eps", {"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
        ("bos id outside the vocab", {"bos_token_id": 99999}, "bos_token_id"),
        ("vocab smaller than the tokenizer", {"vocab_size": 100}, "vocab_size"),
        ("unsupported architecture", {"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    ]:
        yield Case("train", "model config.json", name, model_case(**change), ("config.json", named))

    def file_case(name, content):
        def setup(w):
            (w.base / name).write_bytes(content)
            return train(w)

        return setup

    for name, content in [
        ("model.safetensors", b""),
        ("model.safetensors", b"\x01\x02\x03"),
        ("model.safetensors", b"\xff" * 64),
        ("tokenizer.json", b'{"version": "1.0", "model": '),
        ("tokenizer.json", b""),
        ("config.json", b"{not json"),
    ]:
        yield Case("train", "model files", f"garbled {name} ({len(content)} bytes)", file_case(name, content), (name,))

    def no_tokenizer_config(w):
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            (w.base / name).unlink(missing_ok=True)
        return train(w)

    yield Case("train", "model files", "no tokenizer_config.json", no_tokenizer_config, ("tokenizer_config.json",))
    yield Case("train", "model files", "NaN weights", lambda w: (nan_weights(w), train(w))[1], ("NaN",))

    def data_case(lines_of):
        def setup(w):
            w.train_data.write_bytes(lines_of(w.train_data.read_bytes()))
            return train(w)

        return setup

    long = json.dumps({"id": "long", "problem": "last digit of " + "+".join(["7"] * 200), "answer": "0"}).encode()
    for name, fn, named in [
        ("over-long problem", lambda b: b + long + b"\n", ("long (", "line 17")),
        ("non-UTF-8 byte", lambda b: b + b'{"id": "u", "problem": "\xff", "answer": "1"}\n', ("line 17",)),
        ("invalid JSON line", lambda b: b + b"{oops\n", ("line 17",)),
        ("duplicate id", lambda b: b + b.splitlines()[0] + b"\n", ("line 17", "duplicate")),
        ("missing answer", lambda b: b + b'{"id": "m", "problem": "x"}\n', ("line 17", "answer")),
        ("empty file", lambda b: b"", ("train.jsonl", "no problems")),
        ("a JSON list line", lambda b: b + b"[1, 2]\n", ("line 17",)),
    ]:
        yield Case("train", "training data", name, data_case(fn), named)

    def bad_eval(w):
        w.eval.write_text('{"id": "a", "problem": "x", "answer": "1"}\nnot json\n')
        return train(w)

    yield Case("train", "training data", "bad data.eval (read before training)", bad_eval, ("eval.jsonl line 2",))
    yield Case(
        "train",
        "training data",
        "data.eval with run.eval_max_tokens past the positions",
        lambda w: train(w, "--set", "run.eval_max_tokens=200"),
        ("run.eval_max_tokens = 200", "data.eval"),
        untouched="run/metrics.jsonl",
    )

    def non_utf8_config(w):
        w.config.write_bytes(w.config.read_bytes() + b"\n# caf\xff\n")
        return train(w)

    yield Case("train", "config file", "non-UTF-8 byte", non_utf8_config, ("run.toml:",))

    def bad_toml(w):
        w.config.write_text(w.config.read_text() + "\n[optim\n")
        return train(w)

    yield Case("train", "config file", "invalid TOML", bad_toml, ("run.toml", "invalid TOML"))

    def resume_changed(key):
        def setup(w):
            w.quietly(train(w, "--max-steps", "2"))
            return train(w, "--resume", "--set", key)

        return setup

    for key, named in (("optim.lr=0.5", "optim.lr"), ("score.stage1_steps=1", "score.stage1_steps")):
        yield Case("train", "resume", f"--resume with {key}", resume_changed(key), (named,))
    yield Case("train", "resume", "--resume with score.alpha=0", resume_changed("score.alpha=0"), ("score.alpha",))

    def resume_other_config(w):
        w.quietly(train(w, "--max-steps", "2"))
        edit_json(w.base / "config.json", rms_norm_eps=1e-5)
        return train(w, "--resume")

    yield Case("train", "resume", "--resume with another base config.json", resume_other_config, ("config.json",))

    def resume_other_weights(w):
        w.quietly(train(w, "--max-steps", "2"))
        weights = load_file(str(w.base / "model.safetensors"))
        name = sorted(weights)[0]
        weights[name] = weights[name] + 1e-3
        save_file(weights, str(w.base / "model.safetensors"), metadata={"format": "pt"})
        return train(w, "--resume")

    yield Case(
        "train", "resume", "--resume with other weights of the same shape", resume_other_weights, ("model.safetensors",)
    )

    def resume_no_record(w):
        w.quietly(train(w, "--max-steps", "2"))
        (w.root / "run" / "run.json").unlink()
        return train(w, "--resume", "--set", "optim.lr=0.5")

    yield Case("train", "resume", "--resume of a folder whose run.json was deleted", resume_no_record, ("run.json",))
    yield Case(
        "train",
        "resume",
        "--allow-config-change without --resume",
        lambda w: train(w, "--allow-config-change"),
        ("--allow-config-change",),
    )
    yield Case(
        "train",
        "resume",
        "a second fresh run into a finished folder",
        lambda w: (w.quietly(train(w, "--max-steps", "1")), train(w))[1],
        ("--resume",),
    )
    yield Case("train", "config value", "--max-steps 0", lambda w: train(w, "--max-steps", "0"), ("--max-steps",))
    yield Case(
        "train",
        "config value",
        "run.wandb without a login",
        lambda w: train(w, "--set", "run.wandb=true"),
        ("run.wandb", "WANDB_MODE=offline"),
        env=no_login(),
        untouched="run",
    )

    def mistyped_model(w):
        return train(w, "--set", 'model.path="bse/model"')

    yield Case(
        "train",
        "config value",
        "a mistyped relative model folder",
        mistyped_model,
        ("no folder",),
        {"HF_HUB_OFFLINE": "1"},
    )

    def full_disk_checkpoint(w):
        disk = w.full_disk("96k")
        if disk is None:
            return simulated_full_disk(train(w))
        return ["train", "--config", str(w.config), "--out", str(disk / "run")]

    yield Case("train", "machine", "a full disk during the run's writes", full_disk_checkpoint, ("No space left",))

    for cmd in ("train", "sft", "eval", "demo"):
        yield Case(cmd, "output folder", f"--out under a regular file ({cmd})", out_under_file(cmd), ("cannot write",))


def out_under_file(cmd):
    def setup(w):
        (w.root / "file").write_text("x")
        out = w.root / "file" / "out"
        return {
            "train": ["train", "--config", str(w.config), "--out", str(out)],
            "eval": [*ev(w)[:-1], str(out)],
            "sft": ["sft", "--config", str(w.config), "--out", str(out)],
            "demo": ["demo", "--quick", "--out", str(out)],
        }[cmd]

    return setup


SIMULATED = []  # argv lists whose run sees safetensors fail as on a full disk


def simulated_full_disk(argv):
    SIMULATED.append(argv)
    return argv


def sft_cases():
    for key in [
        "sft.kind=rft",
        "sft.batch_size=0",
        "sft.epochs=0",
        "sft.micro_batch_size=0",
        "sft.max_problems=-1",
        "sft.iterations=-1",
        "sft.include_correct=2",
        "optim.lr=0",
    ]:
        yield Case("sft", "config value", key, lambda w, k=key: sft(w, "--set", k), (f"--set {key}",), untouched="sft")
    yield Case(
        "sft",
        "config value",
        "budget past positions",
        lambda w: sft(w, "--set", "rollout.max_tokens_attempt2=100000"),
        ("rollout.max_tokens_attempt2",),
    )
    yield Case(
        "sft",
        "config value",
        "run.wandb without a login",
        lambda w: sft(w, "--set", "run.wandb=true"),
        ("run.wandb", "WANDB_MODE=offline"),
        env=no_login(),
        untouched="sft",
    )
    yield Case("sft", "config value", "empty data.train", lambda w: sft(w, "--set", 'data.train=""'), ("data.train",))

    def data(fn, named):
        def setup(w):
            w.train_data.write_bytes(fn(w.train_data.read_bytes()))
            return sft(w)

        return Case("sft", "training data", named[0], setup, named[1:])

    long = json.dumps({"id": "long", "problem": "last digit of " + "+".join(["7"] * 200), "answer": "0"}).encode()
    yield data(lambda b: b + b"{oops\n", ("invalid JSON line", "line 17"))
    yield data(lambda b: b"", ("empty file", "no problems"))
    yield data(lambda b: b + long + b"\n", ("over-long problem", "long (", "line 17"))
    yield Case("sft", "model files", "NaN weights", lambda w: (nan_weights(w), sft(w))[1], ("NaN",))
    yield Case(
        "sft",
        "model files",
        "garbled model.safetensors",
        lambda w: ((w.base / "model.safetensors").write_bytes(b"\x01\x02"), sft(w))[1],
        ("model.safetensors",),
    )
    yield Case(
        "sft",
        "training data",
        "data.eval with run.eval_max_tokens past the positions",
        lambda w: sft(w, "--set", "run.eval_max_tokens=200"),
        ("run.eval_max_tokens = 200",),
    )
    yield Case(
        "sft",
        "run",
        "every round keeps no trace (nothing trained)",
        lambda w: sft(w, "--set", "sft.iterations=1"),
        ("no round of star kept a trace",),
    )

    def holding_a_run(w, *extra):
        (w.root / "sft").mkdir()
        (w.root / "sft" / "metrics.jsonl").write_text('{"step": 1, "time": 0}\n')
        return sft(w, *extra)

    yield Case("sft", "resume", "a second run into a folder holding a run", holding_a_run, ("--resume",))
    yield Case(
        "sft",
        "resume",
        "--allow-config-change without --resume",
        lambda w: sft(w, "--allow-config-change"),
        ("--allow-config-change",),
    )

    def resume_changed(w):
        w.quietly(sft(w, "--set", "sft.iterations=1"))
        return sft(w, "--resume", "--set", "sft.iterations=1", "--set", "optim.lr=0.5")

    yield Case("sft", "resume", "--resume with another lr", resume_changed, ("optim.lr",))

    yield Case(
        "sft",
        "resume",
        "--resume of a run folder without run.json",
        lambda w: holding_a_run(w, "--resume"),
        ("run.json",),
    )


def eval_cases():
    flags = [
        (("--scaling", ""), "--scaling ''", "--scaling"),
        (("--scaling", "3,1"), "--scaling 3,1", "--scaling"),
        (("--scaling", "1"), "--scaling 1 (no even budget)", "--scaling"),
        (("--scaling", "a,b"), "--scaling a,b", "--scaling"),
        (("--scaling", "0,2"), "--scaling 0,2", "--scaling"),
        (("--scaling", "2", "--temperature", "inf"), "--temperature inf", "--temperature"),
        (("--scaling", "2", "--temperature", "nan"), "--temperature nan", "--temperature"),
        (("--scaling", "2", "--temperature", "-1"), "--temperature -1", "--temperature"),
        (("--scaling", "2", "--temperature", "0"), "--temperature 0", "--temperature"),
        (("--temperature", "0.5"), "--temperature without --scaling", "--temperature"),
        (("--seed", "3"), "--seed without --scaling", "--seed"),
        (("--scaling", "2", "--seed", "-1"), "--seed -1", "--seed"),
        (("--scaling", "2", "--seed", str(2**31)), "--seed 2**31", "--seed"),
        (("--attempts", "1"), "--attempts 1", "--attempts"),
        (("--max-problems", "-1"), "--max-problems -1", "--max-problems"),
        (("--set", "optim.lr=-1"), "--set optim.lr=-1", "--set optim.lr=-1"),
        (("--set", "nope.x=1"), "--set nope.x=1", "--set nope.x=1"),
        (("--scaling", "1,2", "--set", "reward.kind=code"), "--scaling with code rewards", "reward.kind"),
        (("--self-refine", "--set", 'self_refine.critique_instruction=" "'), "empty critique", "critique_instruction"),
        (("--self-refine",), "Self-Refine budgets past the positions", "self_refine.max_tokens_critique"),
    ]
    for extra, name, named in flags:
        yield Case("eval", "flags", name, evx(*extra), (named,), untouched="e")

    def long_study(*extra):
        return lambda w: [*ev(w, data=long_problem(w, w.eval)), *extra]

    short = ("--set", "self_refine.max_tokens_critique=4")
    for extra, name in [((), "2 attempts"), (("--attempts", "3"), "3 attempts"), (("--scaling", "1,2"), "--scaling")]:
        yield Case(
            "eval", "lengths", f"an over-long problem ({name})", long_study(*extra), ("long-one", "line 4"), {}, "e"
        )
    yield Case(
        "eval",
        "lengths",
        "an over-long problem (Self-Refine)",
        long_study("--self-refine", *short),
        ("long-one", "line 4", "self_refine.max_tokens_critique"),
        untouched="e",
    )

    def given(rows):
        def setup(w):
            path = w.root / "given.jsonl"
            path.write_text(rows(w))
            return [*ev(w), "--first-attempts", str(path)]

        return setup

    first_id = "sum-6-4-5-3"  # the first of the tiny task's eval problems
    for name, rows, named in [
        (
            "an attempt 1 that fills the context",
            lambda w: json.dumps({"id": first_id, "attempt1": "7 " * 300}),
            first_id,
        ),
        ("bad JSON", lambda w: json.dumps({"id": first_id, "attempt1": "x"}) + "\n{oops\n", "given.jsonl line 2"),
        ("an unknown id", lambda w: json.dumps({"id": "nope", "attempt1": "x"}) + "\n", "'nope'"),
        ("a repeated id", lambda w: (json.dumps({"id": first_id, "attempt1": "x"}) + "\n") * 2, "line 2"),
        ("no attempt1", lambda w: json.dumps({"id": first_id}) + "\n", "attempt1"),
        ("an empty file", lambda w: "", "given.jsonl"),
    ]:
        yield Case("eval", "first attempts", f"--first-attempts with {name}", given(rows), (named,), untouched="e")
    yield Case(
        "eval",
        "first attempts",
        "--first-attempts missing",
        evx("--first-attempts", "/nonexistent.jsonl"),
        ("/nonexistent.jsonl",),
        untouched="e",
    )

    def data_line(content, named):
        def setup(w):
            path = w.root / "bad_eval.jsonl"
            path.write_bytes(content)
            return ev(w, data=path)

        return setup

    for name, content, named in [
        ("bad JSON", b'{"id": "a", "problem": "x", "answer": "1"}\n{oops\n', "bad_eval.jsonl line 2"),
        ("non-UTF-8", b'{"id": "a", "problem": "\xff", "answer": "1"}\n', "bad_eval.jsonl line 1"),
        ("empty", b"", "bad_eval.jsonl"),
        ("missing answer", b'{"id": "a", "problem": "x"}\n', "line 1"),
    ]:
        yield Case("eval", "data", f"--data {name}", data_line(content, named), (named,), untouched="e")
    yield Case("eval", "data", "--data missing", lambda w: ev(w, data="/nonexistent.jsonl"), ("/nonexistent.jsonl",))
    yield Case("eval", "model", "NaN weights", lambda w: (nan_weights(w), ev(w))[1], ("NaN",))
    yield Case(
        "eval",
        "model",
        "a mistyped relative model folder",
        lambda w: ["eval", "--model", "bse/model", "--data", str(w.eval), "--out", str(w.root / "e")],
        ("no folder",),
        {"HF_HUB_OFFLINE": "1"},
    )
    yield Case(
        "eval",
        "model",
        "--model is a file",
        lambda w: ["eval", "--model", str(w.eval), "--data", str(w.eval), "--out", "e"],
        ("not a folder",),
    )

    def out_is_file(w):
        (w.root / "f").write_text("x")
        return [*ev(w)[:-1], str(w.root / "f")]

    yield Case("eval", "output folder", "--out FILE", out_is_file, ("f",))


def demo_cases():
    def other_seed(w):
        w.quietly(["demo", "--quick", "--seeds", "1", "--workers", "1", "--out", str(w.root / "d")])
        return ["demo", "--quick", "--seed", "3", "--out", str(w.root / "d")]

    yield Case("demo", "folder", "into another seed's demo", other_seed, ("holds the demo of",))

    def foreign(w):
        (w.root / "d").mkdir()
        (w.root / "d" / "notes.txt").write_text("mine")
        return ["demo", "--quick", "--out", str(w.root / "d")]

    yield Case("demo", "folder", "into a foreign folder", foreign, ("holds no demo",), untouched="d/.score.lock")
    yield Case(
        "demo", "flags", "--seed 2**64", lambda w: ["demo", "--quick", "--seed", str(2**64), "--out", "d"], ("--seed",)
    )
    yield Case("demo", "flags", "--seeds 0", lambda w: ["demo", "--quick", "--seeds", "0", "--out", "d"], ("seeds",))

    def out_is_file(w):
        (w.root / "f").write_text("x")
        return ["demo", "--quick", "--out", str(w.root / "f")]

    yield Case("demo", "folder", "--out FILE", out_is_file, ("f",))


def convert_cases():
    def convert(w, src=None, out=None):
        return ["convert", "gguf", str(src or w.gguf), "--out", str(out or w.root / "hf")]

    def cut(at):
        def setup(w):
            data = w.gguf.read_bytes()
            w.gguf.write_bytes(data[: at if at >= 0 else len(data) + at])
            return convert(w)

        return setup

    for at in (0, 3, 4, 8, 16, 24, 100, 1000, 4000, 20000, -1000, -1):
        yield Case("convert", "cut file", f"cut at byte {at}", cut(at), ("m.gguf", "not a readable GGUF"), {}, "hf")

    def patched(offset, value: bytes):
        def setup(w):
            data = bytearray(w.gguf.read_bytes())
            data[offset : offset + len(value)] = value
            w.gguf.write_bytes(bytes(data))
            return convert(w)

        return setup

    # GGUF's header: magic, version (u32), tensor count (u64), metadata count (u64).
    for name, offset, value in [
        ("bad magic", 0, b"GGML"),
        ("version 99", 4, (99).to_bytes(4, "little")),
        ("a tensor count of 2**40", 8, (2**40).to_bytes(8, "little")),
        ("a metadata count of 2**40", 16, (2**40).to_bytes(8, "little")),
    ]:
        yield Case("convert", "garbled file", name, patched(offset, value), ("m.gguf",), untouched="hf")

    def garbage(w):
        w.gguf.write_bytes(b"not a gguf file at all")
        return convert(w)

    yield Case("convert", "garbled file", "not GGUF at all", garbage, ("m.gguf",), untouched="hf")
    yield Case("convert", "paths", "a missing file", lambda w: convert(w, src=w.root / "no.gguf"), ("no.gguf",))

    def out_exists(w):
        (w.root / "hf").mkdir()
        (w.root / "hf" / "keep.txt").write_text("mine")
        return convert(w)

    yield Case("convert", "paths", "--out a folder with files", out_exists, ("already exists",))

    def out_file(w):
        (w.root / "hf").write_text("x")
        return convert(w)

    yield Case("convert", "paths", "--out a file", out_file, ("hf",))

    def other_arch(w):
        from tests.helpers.gguf_files import write_tiny_gguf

        write_tiny_gguf(w.gguf, "F32", architecture="gemma")
        return convert(w)

    yield Case("convert", "unsupported", "architecture gemma", other_arch, ("gemma",), untouched="hf")

    def full_disk(w):
        disk = w.full_disk("1m")
        if disk is None:
            return simulated_full_disk(convert(w))
        return convert(w, out=disk / "hf")

    yield Case("convert", "machine", "a full disk", full_disk, ("No space left",))


def data_cases():
    def math(w, *, train=None, test=None, math500=None, out=None):
        return [
            "data",
            "math",
            "--train",
            str(train or w.root / "math_train.jsonl"),
            "--test",
            str(test or w.root / "math_test.jsonl"),
            "--math500",
            str(math500 or w.root / "math500.jsonl"),
            "--out",
            str(out or w.root / "d"),
        ]

    def rows(name, content, which):
        def setup(w):
            path, text = w.root / name, content(w)
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
            return math(w, **{which: path})

        return setup

    def first_row(w, name="math500.jsonl"):
        return (w.root / name).read_text().splitlines()[0] + "\n"

    for name, content, which, named in [
        ("repeated MATH500 row", lambda w: first_row(w) * 2, "math500", "the same problem"),
        ("empty train", lambda w: "", "train", "--train"),
        ("empty test", lambda w: "", "test", "--test"),
        ("empty MATH500", lambda w: "", "math500", "--math500"),
        (
            "a MATH500 row not in test",
            lambda w: json.dumps({"problem": "new?", "solution": "x"}) + "\n",
            "math500",
            "1 of 1",
        ),
        ("no solution field", lambda w: json.dumps({"problem": "p?"}) + "\n", "train", "line 1"),
        ("bad JSON", lambda w: "{oops\n", "test", "line 1"),
        ("non-UTF-8", lambda w: b'{"problem": "\xff", "solution": "x"}\n', "train", "line 1"),
    ]:
        yield Case("data", "inputs", name, rows(f"x-{which}.jsonl", content, which), (named,), untouched="d")
    yield Case(
        "data",
        "inputs",
        "a missing file",
        lambda w: math(w, train=w.root / "none.jsonl"),
        ("none.jsonl",),
        untouched="d",
    )

    def not_parquet(w):
        (w.root / "t.parquet").write_bytes(b"not parquet")
        return math(w, test=w.root / "t.parquet")

    yield Case("data", "inputs", "a .parquet that is not Parquet", not_parquet, ("t.parquet",), untouched="d")

    def no_pyarrow(w):
        (w.root / "t.parquet").write_bytes(b"PAR1")
        BLOCKED.append("pyarrow")
        return math(w, test=w.root / "t.parquet")

    yield Case("data", "inputs", "Parquet without pyarrow", no_pyarrow, ("pip install 'score-rl[data]'",))
    yield Case(
        "data",
        "inputs",
        "a Hub dataset not in the offline cache",
        lambda w: math(w, test="nobody/nothing"),
        ("nobody/nothing",),
        {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )

    def out_under_file(w):
        (w.root / "file").write_text("x")
        return math(w, out=w.root / "file" / "d")

    yield Case("data", "output folder", "--out under a regular file", out_under_file, ("cannot write",))


BLOCKED: list[str] = []  # module names whose import fails while the next case runs


def cases():
    for group in (train_cases, sft_cases, eval_cases, demo_cases, convert_cases, data_cases):
        yield from group()


# ---------------------------------------------------------------------------------------------------
# Running and counting
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def environment(env: dict):
    old = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def machine_refusals(argv):
    """A simulated full disk for this argv, and blocked imports, while the command runs."""
    import builtins

    import safetensors.torch
    from safetensors import SafetensorError

    real_save, real_import = safetensors.torch.save_file, builtins.__import__

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def blocked(name, *args, **kwargs):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    if argv in SIMULATED:
        safetensors.torch.save_file = full
    builtins.__import__ = blocked
    try:
        yield
    finally:
        safetensors.torch.save_file, builtins.__import__ = real_save, real_import
        BLOCKED.clear()


def classify(case: Case, work: Work, argv) -> str:
    err, out = io.StringIO(), io.StringIO()
    try:
        with environment(case.env), machine_refusals(argv), contextlib.chdir(work.root):
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse's own refusals
                    code = e.code
    except Exception as e:  # noqa: BLE001 - a traceback is what this counts
        return f"traceback ({type(e).__name__}: {str(e)[:100]})"
    if code == 0:
        return "silent"
    lines = [line for line in err.getvalue().strip().splitlines() if line]
    if lines and lines[0].startswith("usage:"):  # argparse: usage, then its one error line
        lines = lines[-1:]
    if code not in (1, 2) or len(lines) != 1:
        return f"vague (exit {code}, {len(lines)} lines: {' | '.join(lines)[:160]})"
    missing = [e for e in case.expect if e not in lines[0]]
    if missing:
        return f"vague (does not name {missing}: {lines[0][:200]})"
    if case.untouched and (work.root / case.untouched).exists():
        return f"vague (wrote {case.untouched} before refusing: {lines[0][:120]})"
    return f"clear ({lines[0][:200]})"


def main_sweep(argv=None) -> int:
    only = set(argv or []) or set(COMMANDS)
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    template = make_template(root)
    tally: dict[str, Counter] = {c: Counter() for c in COMMANDS if c in only}
    kinds: dict[tuple[str, str], Counter] = {}
    for i, case in enumerate(cases()):
        if case.command not in only:
            continue
        work = Work(root / f"case{i}", template)
        retarget(template, work.root)
        try:
            argv_ = case.setup(work)
            outcome = classify(case, work, argv_)
        finally:
            for cleanup in work.cleanups:
                cleanup()
        kind = outcome.split(" ")[0]
        tally[case.command][kind] += 1
        kinds.setdefault((case.command, case.kind), Counter())[kind] += 1
        print(f"{case.command:8s} | {case.kind:17s} | {case.name:52s} | {outcome}", flush=True)
        shutil.rmtree(work.root, ignore_errors=True)
    print("\n| command | cases | clear | vague | traceback | silent |\n|---|---|---|---|---|---|")
    total = Counter()
    for command, counts in tally.items():
        total.update(counts)
        print(f"| {command} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    print("\n| command | kind of input | cases | clear | vague | traceback | silent |\n|---|---|---|---|---|---|---|")
    for (command, kind), counts in kinds.items():
        print(f"| {command} | {kind} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if total["clear"] == sum(total.values()) else 1


if __name__ == "__main__":
    sys.exit(main_sweep(sys.argv[1:]))
