"""What a run folder says it holds (`run.json`): the resolved config and the identity of the model
and data it trains on, so that `--resume` can refuse to continue a different run.

The identity is content, not paths: sha256 of every file of the model folder that the loader reads
(config.json, the safetensors weights, the tokenizer files) and of each local data file or folder;
a data source that is not a local path (`builtin:`, `hf:`) is identified by its name. So the same
files at another path are the same run, and other weights of the same shape are not. Digests are
computed once and kept in run.json with each file's size and modification time (content_hash.py):
a resume re-reads only files that changed. The config's paths themselves (`model.path`,
`data.train`, `data.eval`) are compared through that identity, never as strings.

Settings that change only what is shown or kept on disk, never the trained weights (`run.progress`,
`run.plots`, `run.tensorboard`, `run.checkpoint_every`, `run.keep_last`, micro-batching), may differ
on resume. A folder that holds a run but no run.json (written before it existed, or deleted) proves
nothing: it resumes only with `--allow-config-change`.
"""

from __future__ import annotations

from pathlib import Path

from score.model.files import read_json_object

from .checkpoints.store import checkpoints_root
from .config import RunConfig
from .content_hash import DigestCache

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
# Paths compared by the content they name (the record's identity), not as strings.
BY_CONTENT = ("model.path", "data.train", "data.eval")
# The files of a model folder that the loader reads, besides its *.safetensors.
MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "model.safetensors.index.json",
)


def _identity(cfg: RunConfig, cache: DigestCache) -> dict:
    model = Path(cfg.model.path)
    identity = {}
    names = [n for n in MODEL_FILES if (model / n).is_file()] + sorted(p.name for p in model.glob("*.safetensors"))
    for name in names:
        key = "model/config.json" if name == "config.json" else f"model/{name} sha256"
        identity[key] = cache.file(model / name)
    for key in ("train", "eval"):
        source = getattr(cfg.data, key)
        local = bool(source) and not source.startswith(("builtin:", "hf:")) and Path(source).exists()
        identity[f"data.{key}"] = f"sha256:{cache.source(source)}" if local else source
    return identity


def run_record(cfg: RunConfig, out_dir: str | Path | None = None) -> dict:
    """The record of a run: flattened config, identity, and the digests' cache (`files`). With
    `out_dir`, the digests its run.json already holds are reused for files that did not change."""
    stored = read_run_record(out_dir, quiet=True) if out_dir is not None else None
    cache = DigestCache(stored.get("files") if stored and isinstance(stored.get("files"), dict) else None)
    identity = _identity(cfg, cache)
    flat = {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}
    return {"config": flat, "identity": identity, "files": cache.used}


def read_run_record(out_dir: str | Path, *, quiet: bool = False) -> dict | None:
    """The run.json of a folder (None when there is none; unreadable: ValueError naming it, or None
    when `quiet`)."""
    file = Path(out_dir) / RUN_RECORD
    if not file.is_file():
        return None
    try:
        return read_json_object(file)
    except (OSError, ValueError):
        if quiet:
            return None
        raise


def holds_a_run(out_dir: str | Path) -> str | None:
    """What shows that a folder holds work of a run (logged steps, checkpoints, a final model), or None."""
    out = Path(out_dir)
    metrics, root = out / "metrics.jsonl", checkpoints_root(out)
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "metrics.jsonl"
    if root.is_dir() and any(not c.name.startswith(".") for c in root.iterdir()):
        return "checkpoints/"
    if (out / "final").exists():
        return "final/"
    return None


def check_same_run(out_dir: Path, record: dict, allow_change: bool, *, flag: str = "--resume") -> None:
    """Refuse to resume `out_dir` with another config or other model/data files unless allowed."""
    stored = read_run_record(out_dir)
    if stored is None:
        if holds_a_run(out_dir) and not allow_change:
            raise ValueError(
                f"{flag}: {out_dir} holds a run but no {RUN_RECORD}, so nothing shows it is this run (config, model, "
                "data); add --allow-config-change to continue it anyway, or use a new --out"
            )
        return
    differences = []
    for part in ("config", "identity"):
        old, new = stored.get(part, {}), record[part]
        for key in sorted(old.keys() | new.keys()):
            if key in DISPLAY_ONLY or key in BY_CONTENT and part == "config" or old.get(key) == new.get(key):
                continue
            differences.append(f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}")
    if differences and not allow_change:
        raise ValueError(
            f"{flag}: {out_dir} holds a different run ({len(differences)} difference"
            f"{'s' if len(differences) > 1 else ''}: {'; '.join(differences)}); resume with the same config, "
            "or add --allow-config-change"
        )
    if differences:
        print(f"{flag} --allow-config-change: continuing with {'; '.join(differences)}", flush=True)


def _short(value) -> str:
    """A value for the differences' list; digests shortened to 12 hex digits."""
    text = repr(value)
    if isinstance(value, str) and len(value) >= 64 and all(c in "0123456789abcdef" for c in value[-64:]):
        text = repr(value[: len(value) - 52] + "…")
    return text
