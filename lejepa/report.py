"""The evaluation's figure and Markdown report, from the training log and `metrics.json`.

The figure has three panels: the LeJEPA loss and its two parts over training steps, the online probe's
accuracy over steps, and the evaluation's top-1 bars for our encoder beside its baselines. Matplotlib runs
with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

FIGURE, REPORT = "evaluation.png", "evaluation.md"
MODEL_NAMES = {
    "encoder": "LeJEPA encoder",
    "random_init": "random init (same architecture)",
    "raw_pixels": "raw pixels (logistic regression)",
}


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def write_figure(history: list[dict[str, Any]], metrics: dict[str, Any], path: str | Path) -> None:
    """Training curves from the metrics log (per-step records) and evaluation bars, as a PNG at `path`."""
    fig, (loss_ax, probe_ax, bars_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, label in (("loss", "LeJEPA loss"), ("prediction", "prediction"), ("sigreg", "SIGReg")):
        steps, values = _series(history, key)
        if steps:
            loss_ax.plot(steps, values, label=label, linewidth=1)
    loss_ax.set(title="Training loss", xlabel="step", yscale="log")
    if history:
        loss_ax.legend()
    else:
        loss_ax.text(0.5, 0.5, "no training log", ha="center", transform=loss_ax.transAxes)

    steps, accuracy = _series(history, "probe_acc")
    if steps:
        probe_ax.plot(steps, accuracy, linewidth=1)
    else:
        probe_ax.text(
            0.5, 0.5, "no online probe (unlabelled data)", ha="center", transform=probe_ax.transAxes
        )
    probe_ax.set(title="Online linear probe (train batches)", xlabel="step", ylabel="top-1", ylim=(0, 1))

    models = metrics["models"]
    names = list(models)
    labelled = any(models[n].get("linear_probe_top1") is not None for n in names)
    if labelled:
        width = 0.38
        for offset, (key, label) in zip(
            (-width / 2, width / 2),
            (("linear_probe_top1", "linear probe"), ("knn_top1", "kNN (k=20)")),
            strict=True,
        ):
            values = [models[n].get(key) or 0.0 for n in names]
            bars = bars_ax.bar([i + offset for i in range(len(names))], values, width, label=label)
            bars_ax.bar_label(bars, labels=[f"{100 * v:.1f}" for v in values], fontsize=8)
        bars_ax.legend(loc="upper right", ncols=2)
    else:
        bars_ax.text(0.5, 0.5, "probes skipped (unlabelled data)", ha="center", transform=bars_ax.transAxes)
    bars_ax.set_xticks(range(len(names)), [MODEL_NAMES.get(n, n).split(" (")[0] for n in names])
    bars_ax.set(title="Evaluation on the test split", ylabel="top-1", ylim=(0, 1.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def results_table(metrics: dict[str, Any]) -> str:
    """Markdown table: one row per model, top-1 and diagnostics in columns."""
    rows = [
        "| model | linear probe top-1 | kNN top-1 | RankMe | SIGReg (embeddings) | LeJEPA loss (held-out) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in metrics["models"].items():
        rows.append(
            f"| {MODEL_NAMES.get(name, name)} | {_percent(m.get('linear_probe_top1'))} | "
            f"{_percent(m.get('knn_top1'))} | {_number(m.get('rankme'))} | {_number(m.get('sigreg'))} | "
            f"{_number(m.get('lejepa_loss'))} |"
        )
    return "\n".join(rows)


def write_report(metrics: dict[str, Any], figure: str) -> str:
    """The evaluation report as Markdown; `figure` is the figure's path relative to the report."""
    d = metrics["dataset"]
    splits = ", ".join(
        f"{role}: `{s['split']}` ({s['num_samples']} images)" for role, s in d["splits"].items()
    )
    lines = [
        f"# Evaluation of `{metrics['run']}`",
        "",
        f"Dataset `{d['name']}` version `{d['version']}` ({splits}); manifest `{d['manifest']}`.",
        f"Encoder weights sha256 `{metrics['encoder']['sha256']}`.",
        "",
        results_table(metrics),
        "",
        f"![training curves and evaluation]({figure})",
        "",
        "## Protocol",
        "",
        *[f"- {key.replace('_', ' ')}: {text}" for key, text in metrics["protocol"].items()],
        "- RankMe: effective rank of the test embeddings (max = embedding dimension); SIGReg: the Epps-Pulley"
        " statistic of the raw embeddings (small = close to N(0, I)); LeJEPA loss: the training objective on"
        " held-out images under the training views.",
    ]
    if metrics["notes"]:
        lines += ["", "## Notes", "", *[f"- {note}" for note in metrics["notes"]]]
    return "\n".join(lines) + "\n"
