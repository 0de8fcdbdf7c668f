"""Per-step metrics: one JSON line per `log` call in `run_dir/metrics.jsonl`, optionally TensorBoard too.

Each line is `{"step": N, "time": unix seconds, <metric>: value, ...}`, flushed at once so a crash
loses nothing already logged. Values are numbers, strings, booleans or None; numpy and 0-d torch
scalars are converted; nested dicts are flattened with "/" (`{"eval": {"acc_t1": x}}` ->
`"eval/acc_t1"`). Non-finite floats are kept (written as NaN/Infinity, which Python's json reads
back) because a skipped step's NaN loss is information.

Resuming: `MetricsLogger(run_dir, resume_step=N)` drops lines of steps after N (written by the
interrupted run after its last checkpoint), so the resumed run does not log those steps twice.
TensorBoard (`tensorboard=True`) needs the `tensorboard` package; without it the logger raises
ImportError saying so. It gets every finite numeric value as a scalar under the same name. Weights &
Biases (`wandb={"project", "name", "config"}`) gets every value of every record at its step, and
`summary()` the end-of-run evaluation; `log_finished_run` sends a job without steps (an evaluation)
as one run.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import time
from pathlib import Path

from score.model.files import write_jsonl

METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "time")


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """Plain JSON scalars keyed by "/"-joined names; raises ValueError naming any bad key or value."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
    flat = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metric names must be non-empty strings, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
            continue
        flat[name] = _scalar(name, value)
    return flat


def _scalar(name: str, value):
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, numbers.Number):
        value = value.item()  # 0-d torch tensor, numpy array or numpy bool
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"metric {name!r} must be a number, string, bool or None, got {type(value).__name__}")


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics file; a torn last line (a crash mid-write) is ignored, any other bad line is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # the file does not end with a newline: the write was cut
                break
            raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {lineno}: expected an object with an integer 'step'")
        records.append(record)
    return records


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = False,
        *,
        resume_step: int | None = None,
        wandb: dict | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                self._file.close()
                raise ImportError(
                    "tensorboard=True needs the 'tensorboard' package (pip install tensorboard); "
                    "metrics.jsonl is written either way"
                ) from e
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb is not None:
            self._wandb = _start_wandb(self.run_dir, resume=resume_step is not None, **wandb)

    def log(self, step: int, metrics: dict) -> dict:
        """Append one record (returned as written)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        flat = flatten_metrics(metrics)
        clash = [k for k in _RESERVED if k in flat]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record itself")
        record = {"step": step, "time": time.time(), **flat}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in flat.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(name, value, global_step=step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in flat.items() if v is not None}, step=step)
        return record

    def summary(self, metrics: dict) -> None:
        """End-of-run figures (the evaluation table): Weights & Biases' run summary, when it is on."""
        if self._wandb is not None:
            self._wandb.summary.update(flatten_metrics(metrics))

    def _truncate_after(self, resume_step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        write_jsonl(self.path, kept)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


WANDB_ID_FILE = "wandb_id"


def log_finished_run(
    run_dir: str | Path, *, project: str, name: str, config: dict, summary: dict, history: list[tuple[int, dict]] = ()
) -> None:
    """One whole Weights & Biases run at once, for a job without steps (`score eval`): each
    `history` row at its step (None values left out), then `summary`, then the run is finished."""
    run_dir = Path(run_dir)
    run = _start_wandb(run_dir, project=project, name=name, config=config, resume=False)
    try:
        for step, row in history:
            run.log({k: v for k, v in flatten_metrics(row).items() if v is not None}, step=step)
        run.summary.update(flatten_metrics(summary))
    finally:
        run.finish()


def _start_wandb(run_dir: Path, *, project: str, name: str, config: dict, resume: bool):
    """A Weights & Biases run writing under `run_dir/wandb/`; a resumed run continues the same one
    (its id is kept in `run_dir/wandb_id`). WANDB_MODE=offline works without a network."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    if resume and id_file.is_file():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = secrets.token_hex(4)  # wandb ids: lowercase letters and digits
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(
        project=project, name=name, config=config, dir=str(run_dir), id=run_id, resume="allow", reinit=True
    )
