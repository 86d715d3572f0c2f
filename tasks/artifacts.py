"""What a flow run shows in the Prefect UI: each stage's artifacts (tables, curves, links).

The content comes from `lejepa.evaluate.report`; this module only names the artifacts and hands them to
Prefect.
"""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from lejepa.data.manifest import ShardManifest
from lejepa.data.shard import ShardSummary
from lejepa.evaluate.report import link_url, metrics_rows, shard_rows, training_curves_markdown
from lejepa.store import layout
from lejepa.store.storage import Storage
from lejepa.tracking import tracker_links
from lejepa.train.training_log import read_training_log


def artifact_key(*parts: str) -> str:
    """A valid artifact key (lowercase letters, digits and dashes only) made of `parts`."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def shard_artifacts(manifest: ShardManifest, summary: ShardSummary) -> None:
    """The dataset's shards as a table, and its rejected samples (the first 200) when there are any."""
    create_table_artifact(
        shard_rows(manifest),
        key=artifact_key("shards", manifest.name),
        description=f"Dataset {manifest.name} {manifest.version}: {summary.manifest} "
        f"({summary.images_per_s} images/s)",
    )
    if manifest.rejected:
        create_table_artifact(
            [{"sample": r.id, "reason": r.reason} for r in manifest.rejected[:200]],
            key=artifact_key("rejections", manifest.name),
            description=f"{len(manifest.rejected)} rejected samples (first 200)",
        )


def training_curves_artifact(storage: Storage, run_name: str, summary: dict[str, Any]) -> None:
    """The run's loss curves (about 20 evenly spaced steps, a sparkline per column) as Markdown."""
    log = read_training_log(storage, layout.run_url(storage, run_name))
    if log:
        create_markdown_artifact(
            training_curves_markdown(run_name, log, summary),
            key=artifact_key("training-curves", run_name),
            description=f"{summary.get('steps')} steps, final loss {summary.get('final_loss')}",
        )


def tracker_artifacts(storage: Storage, run_name: str) -> None:
    """A link to the run in each tracker's UI (MLflow, W&B online) that its tracking.json records."""
    for tracker, url in tracker_links(storage, layout.run_url(storage, run_name)).items():
        create_link_artifact(
            url,
            link_text=f"run {run_name} in {tracker}",
            key=artifact_key(tracker, run_name),
            description=f"The {tracker} run that mirrors run {run_name}: params, curves, scores, releases",
        )


def metrics_artifact(run_name: str, metrics: dict[str, Any]) -> None:
    """The encoder's and the baselines' scores as a table."""
    create_table_artifact(
        metrics_rows(metrics),
        key=artifact_key("metrics", run_name),
        description=f"Frozen-feature evaluation of run {run_name}: {metrics.get('run')}",
    )


def release_artifacts(storage: Storage, run_name: str, model_name: str, release: dict[str, Any]) -> None:
    """Links to the release and to the run's report.html (which publishing rewrites with the release)."""
    promoted = "promoted to latest" if release["promoted"] else "not promoted"
    create_link_artifact(
        link_url(release["model_uri"]),
        link_text=f"{release['version']} ({promoted})",
        key=artifact_key("release", model_name),
        description=release["reason"],
    )
    create_link_artifact(
        link_url(f"{layout.run_url(storage, run_name)}/{layout.HTML_REPORT}"),
        link_text=f"{layout.HTML_REPORT} of run {run_name}",
        key=artifact_key("report", run_name),
        description="The run in one self-contained page: results, release, curves, dataset, config",
    )
