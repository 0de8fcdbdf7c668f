"""Where a run's checkpoints live: one naming scheme, one completeness rule, one pruning policy.

`run_dir/checkpoints/step_00000123/` is a plain checkpoint (plain.py: HF model folder, optimizer
safetensors, RNG states) and `run_dir/checkpoints/step_00000123.dcp/` a sharded one (sharded.py:
torch.distributed.checkpoint files). The names are disjoint, so a lister, a resume or a prune of one
format never sees the other. A checkpoint is complete when its `trainer_state.json` exists: both
formats write that file last into a temporary folder that is renamed into place
(score.model.files.commit_folder, which also replaces an existing step the same way for both).
A checkpoint whose files cannot be read is set aside under a name no lister matches
(`step_00000123.unreadable`), so pruning never keeps it in place of a good one and no later resume
tries it again.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from score.model.files import recover_set_aside

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
KINDS = {"plain": "", "sharded": ".dcp"}  # kind -> folder-name suffix
_NAME = re.compile(r"^step_(\d{8,})(\.dcp)?$")


def _suffix(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


def checkpoints_root(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(run_dir, step: int, kind: str) -> Path:
    return checkpoints_root(run_dir) / f"step_{step:08d}{_suffix(kind)}"


def list_checkpoints(run_dir, kind: str) -> list[Path]:
    """Complete checkpoints of one kind, oldest first (temporaries of an interrupted save are skipped)."""
    suffix, root = _suffix(kind), checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    recover_set_aside(root)  # a re-save killed between its renames left the only complete copy aside
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (match.group(2) or "") == suffix and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir, kind: str) -> Path | None:
    found = list_checkpoints(run_dir, kind)
    return found[-1] if found else None


def prune(run_dir, kind: str, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints of `kind` (None: keep every one)."""
    if keep_last is not None:
        for old in list_checkpoints(run_dir, kind)[:-keep_last]:
            shutil.rmtree(old)


class UnreadableCheckpoint(ValueError):
    """A checkpoint whose files cannot be read (corrupt, truncated, missing); nothing was loaded from it."""


def set_aside(checkpoint: Path) -> Path:
    """Rename an unreadable checkpoint out of the listers' sight; returns its new name."""
    n, target = 1, checkpoint.with_name(f"{checkpoint.name}.unreadable")
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{checkpoint.name}.unreadable-{n}")
    checkpoint.rename(target)
    return target


def check_save_arguments(step, keep_last) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
