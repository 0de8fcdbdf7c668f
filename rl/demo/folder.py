"""The demo's folder: one demo per folder (its identity in demo.json), refused when it holds anything
else; the same demo again replaces its runs."""

from __future__ import annotations

import shutil
from pathlib import Path

from score.model.files import TEMP_PREFIX, read_json_object, write_json

from ..preflight import check_out_dir
from ..run_lock import LOCK_FILE, lock_folder

DEMO_RECORD = "demo.json"


def claim_demo_folder(out: Path, identity: dict) -> Path:
    """The demo's folder, checked before anything is written (the caller holds its lock): a folder
    holding another demo (another seed or size) or anything that is not a demo is refused; the same
    demo again replaces its runs, once the workers of an earlier demo have let go of them."""
    check_demo_folder(out, identity)
    runs = out / "runs"
    for run in sorted(runs.iterdir()) if runs.is_dir() else []:
        if run.is_dir():  # a killed demo's workers die with it; wait the moment they take to exit
            with lock_folder(run, what="run folder", wait_s=10.0):
                pass
    shutil.rmtree(runs, ignore_errors=True)  # the same demo again: its runs start over
    check_out_dir(out)
    write_json(out / DEMO_RECORD, identity)
    return out


def check_demo_folder(out: Path, identity: dict) -> None:
    """Refuse a path that is not a folder, a folder holding another demo, and a non-empty folder that
    holds no demo (its lock file and a killed writer's temporaries aside); reads only."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    record = out / DEMO_RECORD
    if record.is_file():
        held = read_json_object(record)
        if {k: held.get(k) for k in identity} != identity:
            raise FileExistsError(
                f"{out} holds the demo of {held}, not {identity}; it is kept: choose a new --out for this one"
            )
    elif out.is_dir() and any(c.name != LOCK_FILE and not c.name.startswith(TEMP_PREFIX) for c in out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no demo ({DEMO_RECORD}); choose a new --out")
