"""Training checkpoints for exact resume: policy, optimizer, RNG states and trainer state.

Layout of `run_dir/checkpoints/step_00000123/` (store.py names it):
  model/                  the policy in HF layout (`score.model.save_pretrained`: config.json +
                          model.safetensors, loadable by transformers), plus the tokenizer if given
  optimizer.safetensors   every tensor of the optimizer state (`state.<param index>.<name>`); no pickle
  trainer_state.json      the trainer's own state (step, stage, data position, ...), the optimizer's
                          param groups and non-tensor state, the parameter names in optimizer order
                          (checked on load), and the RNG states of python `random`, numpy's global
                          generator, torch CPU and every CUDA device

A checkpoint is written into a temporary folder beside the others and committed by store.py's rule
(every file fsynced, renamed into place, an existing step replaced), so a crash leaves either the old
set or the new one, never a half-written checkpoint. Only the newest `keep_last` are kept.

`load_checkpoint` copies the weights into the existing model (parameter objects are kept, so the
optimizer keeps pointing at them), restores the optimizer and the RNG states, and returns the trainer
state. The policy is saved in the dtype it trains in, so resuming reproduces the run bit for bit.
Not covered: RNGs the trainer creates itself (`torch.Generator` objects); keep their seeds or
positions in the trainer state (the trainer's sampling seeds are keyed on step/prompt/sample).
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from score.model import Transformer, from_pretrained, save_pretrained
from score.model.files import atomic_folder, read_json_object, remove_stale_temporaries, save_safetensors

from .store import (
    STATE_FILE,
    UnreadableCheckpoint,
    check_save_arguments,
    checkpoint_dir,
    checkpoints_root,
    latest_checkpoint,
    prune,
)

FORMAT_VERSION = 1
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_DIR = "model"
KIND = "plain"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Transformer,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    keep_last: int | None = 3,
    *,
    tokenizer=None,
) -> Path:
    """Write the checkpoint of `step` atomically and prune old ones; returns its folder."""
    check_save_arguments(step, keep_last)
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    _check_json(state)
    final = checkpoint_dir(run_dir, step, KIND)
    remove_stale_temporaries(final.parent)
    with atomic_folder(final) as tmp:
        save_pretrained(model, tmp / MODEL_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        record = {"format": FORMAT_VERSION, "step": step, "state": state, "rng": _rng_state()}
        if optimizer is not None:
            tensors, record["optimizer"] = _optimizer_to_files(model, optimizer)
            save_safetensors(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(record, f)
    prune(run_dir, KIND, keep_last)
    return final


def load_checkpoint(
    path: str | Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer | None,
    *,
    restore_rng: bool = True,
) -> dict:
    """Restore model weights, optimizer and RNG states from a checkpoint folder; returns the trainer state.

    The returned dict is the `state` given to save_checkpoint, plus "step". Every file is read before
    anything is changed: a checkpoint whose files cannot be read (corrupt, truncated, missing) raises
    UnreadableCheckpoint and leaves `model`, `optimizer` and the RNGs as they were; one that is read but
    does not fit them (other shapes, another optimizer) raises ValueError.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        hint = ""
        if checkpoints_root(path).is_dir():
            hint = f" (that is a run folder; its newest checkpoint is {latest_checkpoint(path, KIND)})"
        raise FileNotFoundError(f"{path} is not a checkpoint: no {STATE_FILE}{hint}")
    record, weights, tensors = _read(path, optimizer is not None)
    _load_weights(path / MODEL_DIR, weights, model)
    if optimizer is not None:
        _optimizer_from_files(path, record["optimizer"], tensors, model, optimizer)
    if restore_rng:
        _set_rng_state(record["rng"])
    return {**record["state"], "step": record["step"]}


def _read(path: Path, with_optimizer: bool) -> tuple[dict, dict, dict]:
    """(trainer_state.json's record, the weights, the optimizer's tensors) of a checkpoint folder."""
    try:
        record = read_json_object(path / STATE_FILE)
    except (OSError, ValueError) as e:
        raise UnreadableCheckpoint(str(e)) from None
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path / STATE_FILE}: checkpoint format {record.get('format')!r}, expected {FORMAT_VERSION}")
    missing = [k for k in ("step", "state", "rng") if k not in record]
    if with_optimizer and "optimizer" not in record:
        raise ValueError(f"{path} was saved without optimizer state; pass optimizer=None to load weights only")
    if missing:
        raise UnreadableCheckpoint(f"{path / STATE_FILE}: no {', '.join(missing)}")
    try:
        weights = from_pretrained(path / MODEL_DIR, device="cpu").state_dict()
        tensors = load_file(str(path / OPTIMIZER_FILE)) if with_optimizer else {}
    except FileNotFoundError as e:
        raise UnreadableCheckpoint(f"{path}: missing {e.filename or e}") from None
    except Exception as e:  # any reader's error: safetensors, JSON, a truncated file
        raise UnreadableCheckpoint(f"{path}: {e}") from None
    return record, weights, tensors


# --- model -------------------------------------------------------------------------------------------
def _load_weights(model_dir: Path, loaded: dict, model: Transformer) -> None:
    current = model.state_dict()
    if loaded.keys() != current.keys():
        differing = sorted(loaded.keys() ^ current.keys())
        raise ValueError(f"{model_dir}: checkpoint tensors {differing} do not match the model's")
    with torch.no_grad():
        for name, tensor in current.items():
            source = loaded[name]
            if source.shape != tensor.shape or source.dtype != tensor.dtype:
                raise ValueError(
                    f"{model_dir}: {name} is {source.dtype} {list(source.shape)} in the checkpoint, "
                    f"{tensor.dtype} {list(tensor.shape)} in the model"
                )
        for name, tensor in current.items():
            tensor.copy_(loaded[name])


# --- optimizer ---------------------------------------------------------------------------------------
def _param_names(model: Transformer, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [j for j, p in enumerate(group["params"]) if id(p) not in names]
        if missing:
            raise ValueError(f"optimizer param group {i} holds parameters {missing} that are not the model's")
        out.append([names[id(p)] for p in group["params"]])
    return out


def _optimizer_to_files(model, optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        plain = {}
        for key, value in group.items():
            if torch.is_tensor(value):  # e.g. a tensor learning rate
                tensors[f"group.{i}.{key}"] = value.detach().cpu().contiguous()
                plain[key] = {"tensor": True}
            else:
                plain[key] = list(value) if isinstance(value, tuple) else value
        groups.append(plain)
    meta = {
        "class": type(optimizer).__name__,
        "param_groups": groups,
        "scalars": scalars,
        "param_names": _param_names(model, optimizer),
    }
    _check_json(meta, "optimizer state")
    return tensors, meta


def _optimizer_from_files(path: Path, meta: dict, tensors: dict, model, optimizer) -> None:
    if meta["class"] != type(optimizer).__name__:
        raise ValueError(f"{path}: optimizer state is for {meta['class']}, got a {type(optimizer).__name__}")
    names = _param_names(model, optimizer)
    if names != meta["param_names"]:
        raise ValueError(
            f"{path}: the optimizer's parameters (by group, in order) differ from the checkpoint's; "
            f"first group sizes {[len(g) for g in names]} vs {[len(g) for g in meta['param_names']]}"
        )
    state: dict = {}
    for key, value in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "state":
            state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for i, (saved, current) in enumerate(zip(meta["param_groups"], optimizer.param_groups, strict=True)):
        group = {}
        for key, value in saved.items():
            if isinstance(value, dict) and value.get("tensor"):
                group[key] = tensors[f"group.{i}.{key}"].to(current[key].device)
            elif isinstance(current.get(key), tuple):
                group[key] = tuple(value)
            else:
                group[key] = value
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- RNG ---------------------------------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _bytes(torch.get_rng_state()),
        "cuda": [_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(rng["torch"]))
    if rng["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(rng["cuda"]):
            raise ValueError(
                f"checkpoint holds RNG states of {len(rng['cuda'])} CUDA devices, this process sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                "pass restore_rng=False to resume without them (not bit-identical)"
            )
        torch.cuda.set_rng_state_all([_tensor(s) for s in rng["cuda"]])


# --- files -------------------------------------------------------------------------------------------
def _check_json(value: dict, what: str = "state") -> None:
    for key, item in value.items():
        try:
            json.dumps(item)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}[{key!r}] is not JSON-serialisable ({e})") from None
