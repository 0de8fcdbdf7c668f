"""The repository root on sys.path shadows nothing: `python -c` and `python -m pytest` from the root
put it first, where the folder kernels/ (installed as score.kernels) is also Hugging Face's
`kernels`, which transformers imports. Imported by that name, the folder hands the import on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_kernels_from_the_root_is_the_installed_package_not_the_folder():
    pytest.importorskip("kernels")  # Hugging Face's, installed with transformers
    done = from_root("import kernels, sys; print(kernels.__file__); print(sys.modules['kernels'] is kernels)")
    assert done.returncode == 0, done.stderr
    where, same = done.stdout.split()
    assert Path(where).resolve().parent != ROOT / "kernels" and same == "True"


def test_transformers_imports_from_the_root():
    pytest.importorskip("transformers")
    done = from_root("import transformers.activations, score.kernels as k; print(k.__name__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "score.kernels"


def test_the_folder_by_its_bare_name_is_never_our_package():
    """Where no other `kernels` is installed, the bare name fails as if the folder were absent."""
    done = from_root(
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p or 'score' in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('absent', e.name)\n"
        "else:\n    print('found', kernels.__file__)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "absent" or "site-packages" in done.stdout
