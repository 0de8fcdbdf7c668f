"""What a run folder says it holds (`run.json`): the resolved config and the identity of the model
and data it trains on, so that `--resume` can refuse to continue a different run.

The identity is content, not paths: sha256 of the model's config.json, the name and size of each of
its safetensors files (hashing gigabytes of weights at every start would cost more than it guards),
and sha256 of each data file. Settings that change only what is shown or kept on disk, never the
trained weights (`run.progress`, `run.plots`, `run.tensorboard`, `run.checkpoint_every`,
`run.keep_last`), may differ on resume.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from score.model.files import read_json_object

from .config import RunConfig

RUN_RECORD = "run.json"
# Keys a resumed run may change freely: they alter what is shown or saved, or how a step's gradient is
# accumulated (micro-batching), never what the run computes.
DISPLAY_ONLY = (
    "run.progress",
    "run.plots",
    "run.tensorboard",
    "run.checkpoint_every",
    "run.keep_last",
    "optim.prompts_per_micro_batch",
    "optim.tokens_per_micro_batch",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identity(cfg: RunConfig) -> dict:
    model = Path(cfg.model.path)
    identity = {"model/config.json": _sha256(model / "config.json") if (model / "config.json").is_file() else None}
    for weights in sorted(model.glob("*.safetensors")):
        identity[f"model/{weights.name} bytes"] = weights.stat().st_size
    for key in ("train", "eval"):
        source = getattr(cfg.data, key)
        if source and Path(source).is_file():
            identity[f"data.{key} sha256"] = _sha256(Path(source))
    return identity


def run_record(cfg: RunConfig) -> dict:
    flat = {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}
    return {"config": flat, "identity": _identity(cfg)}


def check_same_run(out_dir: Path, record: dict, allow_change: bool) -> None:
    """Refuse to resume `out_dir` with another config or other model/data files unless allowed."""
    file = out_dir / RUN_RECORD
    if not file.is_file():
        return  # a run folder from before run.json existed: nothing to compare
    stored = read_json_object(file)
    differences = []
    for part in ("config", "identity"):
        old, new = stored.get(part, {}), record[part]
        for key in sorted(old.keys() | new.keys()):
            if key in DISPLAY_ONLY or old.get(key) == new.get(key):
                continue
            differences.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if differences and not allow_change:
        raise ValueError(
            f"--resume: {out_dir} holds a different run ({len(differences)} difference"
            f"{'s' if len(differences) > 1 else ''}: {'; '.join(differences)}); resume with the same config, "
            "or add --allow-config-change"
        )
    if differences:
        print(f"--resume --allow-config-change: continuing with {'; '.join(differences)}", flush=True)
