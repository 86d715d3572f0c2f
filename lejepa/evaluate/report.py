"""The evaluation's figure, its Markdown report and its HTML report, from the training log and `metrics.json`.

The figure has three panels: the LeJEPA loss and its two parts over training steps, the online probe's
accuracy over steps, and the evaluation's top-1 bars for our encoder beside its baselines. Matplotlib runs
with the Agg backend (no display needed).

`report.html` is the run in one self-contained page, to open from the run folder with any browser, offline:
the results, the release once published, the figure (embedded as a PNG), the training curves (inline SVG),
the dataset's shards, the protocol and the config (credentials redacted). It has inline CSS and no script,
and loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from lejepa.data.manifest import ShardManifest  # noqa: E402
from lejepa.store.layout import EVALUATION, FIGURE, HTML_REPORT  # noqa: E402
from lejepa.store.storage import Storage  # noqa: E402
from lejepa.train.training_log import read_training_log  # noqa: E402

CURVES = ("loss", "prediction", "sigreg", "probe_acc", "lr")  # the training log's columns the reports show
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


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


RESULT_COLUMNS = (
    "model",
    "linear probe top-1",
    "kNN top-1",
    "kNN top-1 (DINO's)",
    "RankMe",
    "SIGReg (embeddings)",
    "LeJEPA loss (held-out)",
)


def gap_text(mark: dict[str, Any]) -> str:
    """A baseline's gap to the encoder on one probe (`lejepa.evaluate.scoring.gap`), in points, marked
    against the probe's noise: "encoder +3.54, beyond noise 0.10"."""
    noise = mark["noise"]
    verdict = (
        "noise unknown"
        if noise is None
        else f"{'beyond' if mark['beyond_noise'] else 'within'} noise {100 * noise:.2f}"
    )
    return f"encoder {100 * mark['gap']:+.2f}, {verdict}"


def top1_cell(scores: dict[str, Any], probe: str) -> str:
    """A model's top-1 on `probe` ("linear_probe" or "knn"): for a baseline with its `gap_text`, for the
    encoder with the spread of its probe seeds."""
    cell = percent(scores.get(f"{probe}_top1"))
    mark = scores.get("gap_to_encoder", {}).get(probe)
    if mark:
        return f"{cell} ({gap_text(mark)})"
    if len(scores.get(f"{probe}_seeds", [])) > 1:
        return f"{cell} (seeds spread {100 * scores[f'{probe}_spread']:.2f})"
    return cell


def result_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row of formatted cells per model (see RESULT_COLUMNS): top-1 and the label-free diagnostics."""
    return [
        [
            MODEL_NAMES.get(name, name),
            top1_cell(m, "linear_probe"),
            top1_cell(m, "knn"),
            percent(m.get("knn_dino_top1")),
            _number(m.get("rankme")),
            _number(m.get("sigreg")),
            _number(m.get("lejepa_loss")),
        ]
        for name, m in metrics["models"].items()
    ]


def results_table(metrics: dict[str, Any]) -> str:
    """Markdown table: one row per model, top-1 and diagnostics in columns."""
    rows = ["| " + " | ".join(row) + " |" for row in (RESULT_COLUMNS, *result_rows(metrics))]
    return "\n".join([rows[0], "|---" * len(RESULT_COLUMNS) + "|", *rows[1:]])


def text_table(metrics: dict[str, Any]) -> str:
    """Top-1 of every model as aligned plain text, for a terminal."""
    rows = [list(RESULT_COLUMNS[:3]), *(row[:3] for row in result_rows(metrics))]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{row[0]:<{width[0]}}  {row[1]:>{width[1]}}  {row[2]:>{width[2]}}".rstrip() for row in rows
    )


def sampled(log: Sequence[dict[str, Any]], points: int = 20) -> list[dict[str, Any]]:
    """About `points` evenly spaced records of a training log, always ending with the last one."""
    stride = max(1, len(log) // points)
    return [*log[::stride], *([log[-1]] if (len(log) - 1) % stride else [])]


def sparkline(values: Sequence[float]) -> str:
    """The values as one line of block characters (about 40), lowest to highest."""
    bars = "▁▂▃▄▅▆▇█"
    points = values[:: max(1, len(values) // 40)]
    low, high = min(points), max(points)
    span = (high - low) or 1.0
    return "".join(bars[int((v - low) / span * (len(bars) - 1))] for v in points)


def shard_rows(manifest: ShardManifest) -> list[dict[str, Any]]:
    """Samples and shards per split of a dataset version, and how many samples sharding rejected."""
    rows = [
        {"split": split, "samples": info.num_samples, "shards": info.num_shards}
        for split, info in manifest.splits.items()
    ]
    return [*rows, {"split": "rejected", "samples": len(manifest.rejected), "shards": 0}]


DIAGNOSTICS = (
    "RankMe: effective rank of the test embeddings (max = embedding dimension); SIGReg: the Epps-Pulley"
    " statistic of the raw embeddings (small = close to N(0, I)); LeJEPA loss: the training objective on"
    " held-out images under the training views."
)


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
        f"- {DIAGNOSTICS}",
    ]
    if metrics["notes"]:
        lines += ["", "## Notes", "", *[f"- {note}" for note in metrics["notes"]]]
    return "\n".join(lines) + "\n"


# -- the HTML report --------------------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2330; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
code, pre { font: 13px ui-monospace, monospace; background: #f3f4f7; border-radius: 3px; }
code { padding: 0 .25em; } pre { padding: .8em; overflow-x: auto; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { padding: .3em .8em; border-bottom: 1px solid #dde1e8; text-align: left; }
th { background: #f3f4f7; font-weight: 600; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .muted { color: #667085; } .ok { color: #137333; } .no { color: #b3261e; }
svg { display: block; } svg polyline { fill: none; stroke: #2f6fdf; stroke-width: 1.5; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; every cell after the first is a number, aligned right."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{_e(c)}</td>" if i == 0 else f'<td class="n">{_e(c)}</td>' for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def link_url(uri: str) -> str:
    """A URI a browser can follow: a local path becomes `file://...`; URLs stay as they are."""
    return uri if "://" in uri else Path(uri).absolute().as_uri()


def _curve_svg(values: Sequence[float], log_scale: bool, width: int = 320, height: int = 56) -> str:
    """One series as an inline SVG line (about 400 points at most), lowest value at the bottom."""
    points = list(values[:: max(1, len(values) // 400)])
    ys = [math.log10(v) for v in points] if log_scale else points
    low, high = min(ys), max(ys)
    span = (high - low) or 1.0
    step = (width - 4) / max(1, len(ys) - 1)
    coords = " ".join(
        f"{2 + i * step:.1f},{2 + (height - 4) * (1 - (y - low) / span):.1f}" for i, y in enumerate(ys)
    )
    return f'<svg width="{width}" height="{height}" role="img"><polyline points="{coords}"/></svg>'


def _curves(history: Sequence[dict[str, Any]]) -> str:
    columns = [c for c in CURVES if history and c in history[0]]
    if not columns:
        return '<p class="muted">No training log in the run folder.</p>'
    rows = []
    for column in columns:
        values = [r[column] for r in history if r.get(column) is not None]
        log_scale = min(values) > 0 and max(values) > 10 * min(values)
        rows.append(
            f"<tr><td>{_e(column)}{' <span class=muted>(log)</span>' if log_scale else ''}</td>"
            f"<td>{_curve_svg(values, log_scale)}</td>"
            + "".join(f'<td class="n">{v:.4g}</td>' for v in (values[0], values[-1], min(values)))
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("series", f"steps 1 to {history[-1]['step']}", "first", "last", "min")
    )
    steps = _table(
        ["step", *columns], [[r["step"], *(f"{r[c]:.4g}" for c in columns)] for r in sampled(history)]
    )
    return (
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<details><summary>The log at about 20 evenly spaced steps</summary>{steps}</details>"
    )


def _release(release: dict[str, Any] | None) -> str:
    if release is None:
        return (
            '<p class="muted">Not published yet: <code>lejepa-pipeline publish</code> releases this run '
            "(the flow does it after evaluation).</p>"
        )
    verdict = (
        '<span class="ok">promoted to latest</span>'
        if release["promoted"]
        else '<span class="no">not promoted</span>'
    )
    uri = release["model_uri"]
    return (
        f'<p>Release <a href="{_e(link_url(uri))}"><code>{_e(release["version"])}</code></a>: {verdict} '
        f"({_e(release['reason'])}).<br><code>{_e(uri)}</code></p>"
    )


def _overview(metrics: dict[str, Any], history: Sequence[dict[str, Any]]) -> str:
    """The paragraph under the title: how long it trained, the architecture, the weights, the dataset."""
    d, encoder = metrics["dataset"], metrics["encoder"]
    description = encoder.get("description", {})
    about = f"{description.get('backbone', 'encoder')} with {description.get('embed_dim', '?')}-d features"
    splits = ", ".join(
        f"{role} <code>{_e(s['split'])}</code> ({s['num_samples']} images)" for role, s in d["splits"].items()
    )
    trained = f"{history[-1]['step']} training steps, " if history else ""
    return (
        f'<p class="muted">{trained}{_e(about)}, weights sha256 <code>{_e(encoder["sha256"][:16])}</code>.\n'
        f"Dataset <code>{_e(d['name'])}</code> version <code>{_e(d['version'])}</code>: {splits}.</p>"
    )


def _figure(png: bytes | None) -> str:
    if not png:
        return '<p class="muted">No figure.</p>'
    embedded = base64.b64encode(png).decode()
    return f'<img alt="training curves and evaluation" src="data:image/png;base64,{embedded}">'


def html_report(
    metrics: dict[str, Any],
    history: Sequence[dict[str, Any]],
    figure_png: bytes | None = None,
    shards: Sequence[dict[str, Any]] | None = None,
    release: dict[str, Any] | None = None,
) -> str:
    """The run as one self-contained HTML page (see the module doc). `metrics["config"]` must already be
    redacted (lejepa.config.redacted): the page shows it as it is."""
    run_name = metrics["run"].rstrip("/").rsplit("/", 1)[-1]
    dataset = (
        _table(["split", "images", "shards"], [[r["split"], r["samples"], r["shards"]] for r in shards])
        if shards
        else ""
    )
    notes = "".join(f"<li>{_e(n)}</li>" for n in metrics.get("notes", []))
    protocol = "".join(f"<li>{_e(k.replace('_', ' '))}: {_e(v)}</li>" for k, v in metrics["protocol"].items())
    config = json.dumps(metrics.get("config", {}), indent=2, sort_keys=True)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LeJEPA run {_e(run_name)}</title><style>{STYLE}</style></head>
<body>
<h1>LeJEPA run <code>{_e(run_name)}</code></h1>
{_overview(metrics, history)}

<h2>Results on the test split</h2>
{_table(RESULT_COLUMNS, result_rows(metrics))}

<h2>Release</h2>
{_release(release)}

<h2>Training curves and evaluation</h2>
{_figure(figure_png)}
{_curves(history)}

<h2>Dataset</h2>
<p>Manifest <code>{_e(metrics["dataset"]["manifest"])}</code>.</p>
{dataset}

<h2>Protocol</h2>
<ul>{protocol}<li>{_e(DIAGNOSTICS)}</li></ul>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<h2>Configuration</h2>
<details><summary>The run's config (storage credentials redacted)</summary><pre>{_e(config)}</pre></details>
</body></html>
"""


def write_html_report(
    storage: Storage, run_url: str, metrics: dict[str, Any], release: dict[str, Any] | None = None
) -> str:
    """Write `{run_url}/report.html` from `metrics` and what the run folder holds (the training log, the
    figure, the dataset's manifest); `release` is the publish stage's summary once there is one. Returns
    the report's URL."""
    figure_url, manifest_url = f"{run_url}/{FIGURE}", metrics["dataset"]["manifest"]
    figure = storage.read_bytes(figure_url) if storage.exists(figure_url) else None
    shards = shard_rows(ShardManifest.load(storage, manifest_url)) if storage.exists(manifest_url) else None
    url = f"{run_url}/{HTML_REPORT}"
    page = html_report(metrics, read_training_log(storage, run_url), figure, shards, release)
    storage.write_bytes(url, page.encode())
    return url


def write_evaluation_reports(storage: Storage, run_url: str, metrics: dict[str, Any]) -> tuple[str, str]:
    """Write the evaluation's figure, its Markdown report and `report.html` into the run folder, from
    `metrics` and the run's training log; returns the URLs of the figure and of the Markdown report."""
    figure_url, report_url = f"{run_url}/{FIGURE}", f"{run_url}/{EVALUATION}"
    with tempfile.TemporaryDirectory() as tmp:
        write_figure(read_training_log(storage, run_url), metrics, Path(tmp) / FIGURE)
        storage.put_file(Path(tmp) / FIGURE, figure_url)
    storage.write_bytes(report_url, write_report(metrics, FIGURE).encode())
    write_html_report(storage, run_url, metrics)
    return figure_url, report_url


def metrics_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model scored (the encoder and its baselines), every score rounded to 4 places, and each
    baseline's gaps to the encoder as the report writes them."""
    rows = []
    for model, scores in metrics.get("models", {}).items():
        row: dict[str, Any] = {"model": model}
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()})
        for probe, mark in row.pop("gap_to_encoder", {}).items():
            row[f"{probe}_vs_encoder"] = gap_text(mark)
        row.pop("linear_probe_seeds", None)
        rows.append(row)
    return rows


def training_curves_markdown(run_name: str, log: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The run's training curves in Markdown: a sparkline per column, then about 20 evenly spaced steps."""
    columns = [c for c in CURVES if c in log[0]]
    lines = [
        f"# Training curves of run `{run_name}`",
        "",
        *(
            f"- {c}: `{sparkline([r[c] for r in log])}` ({log[0][c]:.4g} -> {log[-1][c]:.4g})"
            for c in columns
        ),
        "",
        "| step | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        *(f"| {r['step']} | " + " | ".join(f"{r[c]:.4g}" for c in columns) + " |" for r in sampled(log)),
        "",
        f"Checkpoint: `{summary.get('checkpoint')}`; encoder: `{summary.get('encoder')}`.",
    ]
    return "\n".join(lines)
