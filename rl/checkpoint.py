"""Training checkpoints for exact resume: policy, optimizer, RNG states and trainer state.

Layout of `run_dir/checkpoints/step_00000123/`:
  model/                  the policy in HF layout (`score.model.save_pretrained`: config.json +
                          model.safetensors, loadable by transformers), plus the tokenizer if given
  optimizer.safetensors   every tensor of the optimizer state (`state.<param index>.<name>`); no pickle
  trainer_state.json      the trainer's own state (step, stage, data position, ...), the optimizer's
                          param groups and non-tensor state, the parameter names in optimizer order
                          (checked on load), and the RNG states of python `random`, numpy's global
                          generator, torch CPU and every CUDA device

A checkpoint is written into a temporary folder beside the others, every file fsynced, then renamed
into place (and the parent folder fsynced), so a crash leaves either the old set or the new one,
never a half-written checkpoint. Only the newest `keep_last` are kept.

`load_checkpoint` copies the weights into the existing model (parameter objects are kept, so the
optimizer keeps pointing at them), restores the optimizer and the RNG states, and returns the trainer
state. The policy is saved in the dtype it trains in, so resuming reproduces the run bit for bit.
Not covered: RNGs the trainer creates itself (`torch.Generator` objects); keep their seeds or
positions in the trainer state (the trainer's sampling seeds are keyed on step/prompt/sample).
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from score.model import Transformer, from_pretrained, save_pretrained
from score.model.json_file import read_json_object

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_DIR = "model"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are skipped)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        # A sharded checkpoint (dist_checkpoint.py, DCP's .metadata) shares the folder and the state file.
        if match and (child / STATE_FILE).is_file() and not (child / ".metadata").exists():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


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
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    _check_json(state)
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)

    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        save_pretrained(model, tmp / MODEL_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        record = {"format": FORMAT_VERSION, "step": step, "state": state, "rng": _rng_state()}
        if optimizer is not None:
            tensors, record["optimizer"] = _optimizer_to_files(model, optimizer)
            save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(record, f)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
            old = final.with_name(f".tmp-old-{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def load_checkpoint(
    path: str | Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer | None,
    *,
    restore_rng: bool = True,
) -> dict:
    """Restore model weights, optimizer and RNG states from a checkpoint folder; returns the trainer state.

    The returned dict is the `state` given to save_checkpoint, plus "step".
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        hint = ""
        if (path / CHECKPOINTS).is_dir():
            hint = f" (that is a run folder; its newest checkpoint is {latest_checkpoint(path)})"
        raise FileNotFoundError(f"{path} is not a checkpoint: no {STATE_FILE}{hint}")
    record = read_json_object(state_file)
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(f"{state_file}: checkpoint format {record.get('format')!r}, expected {FORMAT_VERSION}")

    _load_weights(path / MODEL_DIR, model)
    if optimizer is not None:
        if "optimizer" not in record:
            raise ValueError(f"{path} was saved without optimizer state; pass optimizer=None to load weights only")
        _optimizer_from_files(path, record["optimizer"], model, optimizer)
    if restore_rng:
        _set_rng_state(record["rng"])
    return {**record["state"], "step": record["step"]}


# --- model -------------------------------------------------------------------------------------------
def _load_weights(model_dir: Path, model: Transformer) -> None:
    loaded = from_pretrained(model_dir, device="cpu").state_dict()
    current = model.state_dict()
    if loaded.keys() != current.keys():
        differing = sorted(loaded.keys() ^ current.keys())
        raise ValueError(f"{model_dir}: checkpoint tensors {differing} do not match the model's")
    with torch.no_grad():
        for name, tensor in current.items():
            source = loaded[name]
            if source.shape != tensor.shape or source.dtype != tensor.dtype:
                raise ValueError(f"{model_dir}: {name} is {source.dtype} {list(source.shape)} in the checkpoint, "
                                 f"{tensor.dtype} {list(tensor.shape)} in the model")
            tensor.copy_(source)


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
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars,
            "param_names": _param_names(model, optimizer)}
    _check_json(meta, "optimizer state")
    return tensors, meta


def _optimizer_from_files(path: Path, meta: dict, model, optimizer) -> None:
    if meta["class"] != type(optimizer).__name__:
        raise ValueError(f"{path}: optimizer state is for {meta['class']}, got a {type(optimizer).__name__}")
    names = _param_names(model, optimizer)
    if names != meta["param_names"]:
        raise ValueError(f"{path}: the optimizer's parameters (by group, in order) differ from the checkpoint's; "
                         f"first group sizes {[len(g) for g in names]} vs {[len(g) for g in meta['param_names']]}")
    file = path / OPTIMIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: missing {OPTIMIZER_FILE}")
    tensors = load_file(str(file))
    state: dict = {}
    for key, value in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "state":
            state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for i, (saved, current) in enumerate(zip(meta["param_groups"], optimizer.param_groups)):
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
            raise ValueError(f"checkpoint holds RNG states of {len(rng['cuda'])} CUDA devices, this process sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                             "pass restore_rng=False to resume without them (not bit-identical)")
        torch.cuda.set_rng_state_all([_tensor(s) for s in rng["cuda"]])


# --- files -------------------------------------------------------------------------------------------
def _check_json(value: dict, what: str = "state") -> None:
    for key, item in value.items():
        try:
            json.dumps(item)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}[{key!r}] is not JSON-serialisable ({e})") from None


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(root: Path) -> None:
    # Left by a save that was killed midway; never a complete checkpoint (those are renamed).
    for child in root.iterdir():
        if child.name.startswith(".tmp-") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
