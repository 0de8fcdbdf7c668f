"""Sharded trainer checkpoints with torch.distributed.checkpoint (DCP) and a consolidated HF export.

Layout: `run_dir/checkpoints/step_000042/` holds DCP's files (`.metadata` + one `__N_0.distcp`
per writing rank: every rank writes only its own shards of the policy and of AdamW's state, in
parallel) and `trainer_state.json` (step, RNG seeds, whatever the trainer passes). DCP stores
each tensor with its global shape and the offsets of every shard, so `load_sharded` re-slices on
load: a checkpoint written by 8 ranks resumes on 1, 2 or 4 (or in a plain process without a
process group, for a plain unsharded model).

Atomic: ranks write into `step_000042.tmp/`; after a barrier rank 0 writes the JSON and renames
the folder, so a crash mid-save never leaves a folder that looks complete. `keep_last` prunes
older ones (rank 0, after the rename).

`export_consolidated(model, path)` all-gathers the full weights onto rank 0's CPU and writes the
HF layout (`score.model.save_pretrained`: model.safetensors + config.json) that `from_pretrained`
and transformers load. Every rank must call it (the gather is a collective); only rank 0 writes.

Not done: async saving (dcp.async_save) and checkpoints of the engine's KV cache (rebuilt on resume).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from .distributed import raise_on_all_ranks

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def save_sharded(run_dir, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                 *, keep_last: int = 3) -> Path:
    """Every rank calls this; returns `run_dir/checkpoints/step_XXXXXX`. `state` must be JSON-able."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    try:
        state_json = json.dumps({**state, "step": step, "world_size": dist.get_world_size() if _is_dist() else 1},
                                indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"trainer state must be JSON-serialisable: {exc}") from None
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    error = None
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():
            error = f"checkpoint {final} already exists"
        elif tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save
    raise_on_all_ranks(error)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP warns that it saves "in a single process", as we asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not _is_dist())
    _barrier()
    if _rank() == 0:
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            f.write(state_json)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for old in sorted_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final


def sorted_checkpoints(run_dir) -> list[Path]:
    """This format's checkpoints of a run, oldest first: only DCP folders (`.metadata`), so a plain
    checkpoint in the same folder (checkpoint.py, `step_` + 8 digits) is never resumed or pruned here."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file()]
    return [p for _, p in sorted(found)]


def latest_sharded(run_dir) -> Path | None:
    found = sorted_checkpoints(run_dir)
    return found[-1] if found else None


def load_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a `save_sharded` folder into `model` (sharded for any world size, or plain) and
    `optimizer` (None: weights only); every rank calls it. Returns the trainer state dict."""
    path = Path(path)
    error = None
    if _rank() == 0:
        if not (path / ".metadata").is_file():
            error = f"{path} is not a sharded checkpoint (no .metadata; expected a save_sharded folder)"
        elif not (path / STATE_FILE).is_file():
            error = f"{path} has no {STATE_FILE} (an interrupted save?)"
    raise_on_all_ranks(error)
    with warnings.catch_warnings():  # DCP warns that it loads "in a single process", as we asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load(path, model, optimizer)
    with open(path / STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


def _load(path: Path, model: nn.Module, optimizer) -> None:
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(path), no_dist=not _is_dist())
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), no_dist=not _is_dist())
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU, on rank 0 (other ranks get {}); a collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def export_consolidated(model: nn.Module, path, *, dtype: torch.dtype | None = None) -> Path | None:
    """Write the whole policy as an HF checkpoint folder (rank 0 writes; every rank must call).

    `dtype` None keeps the master weights' dtype (fp32); torch.bfloat16 halves the file."""
    from score.model import Transformer, save_pretrained

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"export_consolidated needs a score.model.Transformer, got {type(model).__name__}")
    full = full_state_dict(model)
    out = None
    if _rank() == 0:
        with torch.device("meta"):
            plain = Transformer(config)
        tensors = {k: (v if dtype is None else v.to(dtype)) for k, v in full.items()}
        plain.load_state_dict(tensors, strict=True, assign=True)
        save_pretrained(plain, path)
        out = Path(path)
    _barrier()
    return out
