"""Sharded trainer checkpoints with torch.distributed.checkpoint (DCP) and a consolidated HF export.

Layout (store.py names it): `run_dir/checkpoints/step_00000042.dcp/` holds DCP's files (`.metadata` + one `__N_0.distcp`
per writing rank: every rank writes only its own shards of the policy and of AdamW's state, in
parallel) and `trainer_state.json` (step, RNG seeds, whatever the trainer passes). DCP stores
each tensor with its global shape and the offsets of every shard, so `load_sharded` re-slices on
load: a checkpoint written by 8 ranks resumes on 1, 2 or 4 (or in a plain process without a
process group, for a plain unsharded model).

Atomic: ranks write into a temporary folder rank 0 made beside it; after a barrier rank 0 writes
the JSON and commits the folder by store.py's rule (an existing step is replaced), so a crash
mid-save never leaves a folder that looks complete. `keep_last` prunes older ones (rank 0, after
the commit).

`export_consolidated(model, path)` all-gathers the full weights onto rank 0's CPU and writes the
HF layout (`score.model.save_pretrained`: model.safetensors + config.json) that `from_pretrained`
and transformers load. Every rank must call it (the gather is a collective); only rank 0 writes.

Not done: async saving (dcp.async_save) and checkpoints of the engine's KV cache (rebuilt on resume).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from score.model.files import commit_folder, read_json_object, remove_stale_temporaries, temp_folder

from ..ranks import raise_on_all_ranks
from .store import STATE_FILE, check_save_arguments, checkpoint_dir, prune

KIND = "sharded"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def save_sharded(
    run_dir, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, *, keep_last: int | None = 3
) -> Path:
    """Every rank calls this; returns `run_dir/checkpoints/step_XXXXXXXX.dcp`. `state` must be JSON-able."""
    check_save_arguments(step, keep_last)
    try:
        state_json = json.dumps(
            {**state, "step": step, "world_size": dist.get_world_size() if _is_dist() else 1}, indent=2, sort_keys=True
        )
    except TypeError as exc:
        raise ValueError(f"trainer state must be JSON-serialisable: {exc}") from None
    final = checkpoint_dir(run_dir, step, KIND)
    box = [None]
    if _rank() == 0:
        remove_stale_temporaries(final.parent)
        box = [str(temp_folder(final))]
    if _is_dist():
        dist.broadcast_object_list(box, src=0)  # every rank writes its shards into rank 0's folder
    tmp = Path(box[0])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP warns that it saves "in a single process", as we asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not _is_dist())
    _barrier()
    if _rank() == 0:
        (tmp / STATE_FILE).write_text(state_json, encoding="utf-8")
        commit_folder(tmp, final)
        prune(run_dir, KIND, keep_last)
    _barrier()
    return final


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
    return read_json_object(path / STATE_FILE)


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
