"""PNG plots of a run from its metrics.jsonl (matplotlib, Agg backend: no display needed).

- `accuracy.png`: accuracy at attempt 1 and 2 over steps (top) and Δ(t1,t2) with Δi→c and Δc→i (bottom).
- `reward_kl.png`: reward per attempt (top) and KL per attempt (bottom).

Series are found by the last "/"-separated part of a metric name, so `acc_t1`, `train/acc_t1` and
`eval/acc_t1` are all accuracy-at-t1 curves, labelled by their prefix:
accuracy `acc_t1`, `acc_t2`; Δ `delta`, `delta_i2c`, `delta_c2i`; reward `reward_1`, `reward_2`;
KL `kl_1`, `kl_2`. Points whose value is missing, None or non-finite are left out. A figure with
no series at all is not written; a file with none of these metrics is an error naming what it has.
"""

from __future__ import annotations

import math
from pathlib import Path

from score.model.files import atomic_path

from .run_log import read_metrics

FIGURES = {
    "accuracy.png": (
        "Self-correction accuracy",
        (("Accuracy", ("acc_t1", "acc_t2")), ("Δ(t1, t2)", ("delta", "delta_i2c", "delta_c2i"))),
    ),
    "reward_kl.png": (
        "Reward and KL per attempt",
        (("Reward", ("reward_1", "reward_2")), ("KL to reference", ("kl_1", "kl_2"))),
    ),
}


def _series(records: list[dict], suffix: str) -> dict[str, tuple[list[int], list[float]]]:
    """{metric name: (steps, values)} for every name whose last part is `suffix`."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for name, value in record.items():
            if name.rsplit("/", 1)[-1] != suffix:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps, values = out.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return out


def plot_run(metrics_jsonl_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the run's figures into `out_dir`; returns the paths written."""
    plt = _pyplot()

    records = read_metrics(metrics_jsonl_path)
    if not records:
        raise ValueError(f"{metrics_jsonl_path}: no records to plot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (title, panels) in FIGURES.items():
        panel_series = [
            (label, {name: s for suffix in suffixes for name, s in _series(records, suffix).items()})
            for label, suffixes in panels
        ]
        if not any(series for _, series in panel_series):
            continue
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.2 * len(panels)), sharex=True, squeeze=False)
        for ax, (label, series) in zip(axes[:, 0], panel_series, strict=True):
            for name, (steps, values) in sorted(series.items()):
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, alpha=0.5)
        axes[0, 0].set_title(title)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        written.append(_save(fig, out_dir, filename))
        plt.close(fig)
    if not written:
        wanted = sorted({s for _, panels in FIGURES.values() for _, suffixes in panels for s in suffixes})
        found = sorted({k for r in records for k in r} - {"step", "time"})
        raise ValueError(
            f"{metrics_jsonl_path}: none of the plotted metrics {wanted} (by last '/' part) were logged; found {found}"
        )
    return written


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_demo(
    results: dict, run_dirs: dict[str, list[Path]], out_dir: str | Path, *, labels: dict[str, str], window: int = 5
) -> list[Path]:
    """The demo's figures: `accuracy_bars.png` (greedy Acc@t1 / Acc@t2 per method, mean ± s.e. over
    seeds) and `training_curves.png` (sampled reward of each attempt per step, smoothed over `window`
    steps and averaged over seeds, one panel per method, the Stage I/II boundary dashed)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    methods = results["methods"]
    names = list(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names)), 3.6))
    for offset, (key, label) in ((-0.2, ("acc_t1", "Acc@t1")), (0.2, ("acc_t2", "Acc@t2"))):
        means = [100 * methods[n]["mean"][key] for n in names]
        errors = [100 * (methods[n]["stderr"][key] or 0.0) for n in names]
        ax.bar([i + offset for i in range(len(names))], means, width=0.4, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([labels[n] for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, out_dir, "accuracy_bars.png"))
    plt.close(fig)

    panels = [n for n in run_dirs if run_dirs[n]]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
        for ax, name in zip(axes[:, 0], panels, strict=True):
            runs = [read_metrics(Path(d) / "metrics.jsonl") for d in run_dirs[name]]
            for key, label in (("reward_1", "attempt 1"), ("reward_2", "attempt 2")):
                curves = [[r[key] for r in run if key in r] for run in runs]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
                ax.plot(range(1, length + 1), _smoothed(mean, window), label=label)
            stage2 = [r["step"] for r in runs[0] if r.get("stage") == 2]
            if stage2 and stage2[0] > 1:
                ax.axvline(stage2[0] - 0.5, color="grey", linestyle="--", linewidth=1, label="Stage II starts")
            ax.set_title(f"{labels[name]} (mean of {len(runs)} seeds, {window}-step moving average)", fontsize=9)
            ax.set_ylabel("sampled reward")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        written.append(_save(fig, out_dir, "training_curves.png"))
        plt.close(fig)
    return written


COLLAPSE_PANELS = (
    ("reward_1", "training accuracy, attempt 1"),
    ("changed_frac", "attempt 2 changed the answer"),
    ("edit_ratio", "edit-distance ratio y1 → y2"),
)


def plot_collapse(results: dict, out_dir: str | Path, *, labels: dict[str, str], window: int = 5) -> Path:
    """`collapse.png`, the paper's collapse diagnostics over training: per RL method (its `curves` in
    `results`, the mean over seeds), the sampled accuracy of attempt 1 on the training problems, the
    fraction of attempt-2 answers that differ from attempt 1 and the edit-distance ratio between the
    attempts, each smoothed over `window` steps; the Stage I/II boundary dashed."""
    plt = _pyplot()
    curves = {name: m["curves"] for name, m in results["methods"].items() if "curves" in m}
    fig, axes = plt.subplots(len(COLLAPSE_PANELS), 1, figsize=(7, 2.5 * len(COLLAPSE_PANELS)), sharex=True)
    boundaries = {c["stage2_step"] for c in curves.values() if c.get("stage2_step")}
    # one colour per method in every panel, whether or not the method has that series
    colours = {name: f"C{i % 10}" for i, name in enumerate(curves)}
    for ax, (key, label) in zip(axes, COLLAPSE_PANELS, strict=True):
        for name, c in curves.items():
            if key in c:
                ax.plot(
                    range(1, len(c[key]) + 1),
                    _smoothed(c[key], window),
                    label=labels[name],
                    color=colours[name],
                    linewidth=1.2,
                )
        for step in sorted(boundaries):
            ax.axvline(step - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_title(
        f"Collapse diagnostics on the training problems (sampled; mean over seeds,\n{window}-step moving "
        "average; dashed: Stage II starts)",
        fontsize=8,
    )
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    path = _save(fig, Path(out_dir), "collapse.png")
    plt.close(fig)
    return path


def plot_scaling(scaling: dict, out_dir: str | Path) -> Path:
    """`scaling.png`: majority-vote accuracy against samples per problem, parallel vs sequential
    (`rl.scaling.inference_scaling`'s result)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    budgets = scaling["budgets"]
    ax.plot(budgets, [100 * a for a in scaling["parallel"]], marker="o", label="parallel (majority over B samples)")
    even = [(b, a) for b, a in zip(budgets, scaling["sequential"], strict=True) if a is not None]
    ax.plot([b for b, _ in even], [100 * a for _, a in even], marker="s", label="sequential (B/2 samples + correction)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("samples per problem (B)")
    ax.set_ylabel("majority-vote accuracy (%)")
    ax.set_title(f"Inference-compute scaling (temperature {scaling['temperature']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, Path(out_dir), "scaling.png")
    plt.close(fig)
    return path


def plot_attempts(metrics: dict, out_dir: str | Path) -> Path:
    """`attempts.png`: greedy accuracy at each attempt (`evaluate(..., attempts=N)`'s metrics)."""
    plt = _pyplot()
    per_attempt = metrics["acc_per_attempt"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(range(1, len(per_attempt) + 1), [100 * a for a in per_attempt], marker="o")
    ax.set_xticks(range(1, len(per_attempt) + 1))
    ax.set_xlabel("attempt")
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_title("Accuracy per attempt (attempts after the second repeat the instruction)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = _save(fig, Path(out_dir), "attempts.png")
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # must precede pyplot's import; a headless machine has no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, filename: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / filename) as tmp:  # never a half-written PNG
        fig.savefig(tmp, dpi=110, format="png")
    return out_dir / filename
