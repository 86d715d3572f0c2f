"""One Prefect task per pipeline stage: thin wrappers over `lejepa` that add caching, artifacts and logs.

Every task is idempotent. Its cache key is a fingerprint of the content it depends on (the dataset
version, which hashes the source and the sharding parameters; the config sections that shape the result;
the checkpoint or metrics it consumes), and its result is persisted under `{storage.root}/prefect-results`,
so a rerun after a failure skips every stage that already finished. Retries, retry delays and timeouts
come from `orchestration.*` through `configured(...)`. Each task is a plain callable too: `task.fn(...)`.

Secrets never leave the config object: summaries, artifacts, parameters (whose JSON masks them) and the
ranks' config file hold no credentials and no secret storage.options (the ranks get them through their
environment, see lejepa.pretrain).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.filesystems import RemoteFileSystem

from lejepa.config import PipelineConfig, StagePolicy
from lejepa.evaluate import METRICS, run_evaluate, sha256_of
from lejepa.pretrain import run_pretrain, run_url
from lejepa.publish import run_publish
from lejepa.report import (
    CURVES,
    HTML_REPORT,
    link_url,
    read_training_log,
    sampled,
    shard_rows,
    sparkline,
)
from lejepa.shard import (
    GroupResult,
    ShardManifest,
    ShardPlan,
    ShardSummary,
    commit_manifest,
    manifest_url_for,
    write_shard_group,
)
from lejepa.storage import Storage

RESULTS_FOLDER = "prefect-results"


# -- fingerprints and task options ------------------------------------------------------------------------


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-able parts (the building block of every cache key)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _public(cfg: PipelineConfig, *sections: str) -> dict[str, Any]:
    # Secrets dump masked in JSON mode, so credentials never enter a key (rotating them keeps caches).
    tree = cfg.model_dump(mode="json")
    return {name: tree[name] for name in sections}


def result_storage(cfg: PipelineConfig) -> Path | RemoteFileSystem:
    """Where task results (and so the cache) persist: `{storage.root}/prefect-results`.

    A local root is a plain folder. An S3 root needs a saved block; it holds only the endpoint and the
    region, never a secret. The block returned writes through the store's own filesystem, with the config's
    credentials and options; one loaded from the Prefect database elsewhere uses that machine's AWS chain.
    """
    storage = Storage.from_config(cfg.storage)
    url = storage.url(RESULTS_FOLDER)
    if storage.protocol == "file":
        return Path(url)
    settings: dict[str, Any] = {}
    if cfg.storage.endpoint_url:
        settings["endpoint_url"] = cfg.storage.endpoint_url
    if cfg.storage.region:
        settings["client_kwargs"] = {"region_name": cfg.storage.region}
    block = RemoteFileSystem(basepath=url, settings=settings)
    block.save(f"lejepa-results-{fingerprint(url, settings)[:12]}", overwrite=True)
    block._filesystem = storage.fs  # the block's fsspec cache: set, it is never built from settings
    return block


def configured(stage_task: Task, cfg: PipelineConfig, policy: StagePolicy, refresh: bool = False) -> Task:
    """`stage_task` with the retries, delay and timeout of `policy`, persisting its results to the store."""
    return stage_task.with_options(
        retries=policy.retries,
        retry_delay_seconds=policy.retry_delay_s,
        timeout_seconds=policy.timeout_s,
        result_storage=result_storage(cfg),
        refresh_cache=refresh,
    )


def _key(name: str) -> Any:
    """A cache_key_fn that reads the key the caller computed into the task's `key` parameter."""

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return f"{name}-{parameters['key']}"

    return cache_key


def _artifact_key(*parts: str) -> str:
    # Artifact keys may hold lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


# -- shard ------------------------------------------------------------------------------------------------


@task(name="check-dataset", cache_policy=NO_CACHE, log_prints=True)
def committed_dataset(cfg: PipelineConfig, force: bool) -> dict | None:
    """The summary of `cfg`'s dataset when it is already committed, else None (to be sharded).

    With force the manifest is removed first: a crash during the rebuild must not expose it.
    """
    storage = Storage.from_config(cfg.storage)
    storage.check(write=True)
    url = manifest_url_for(cfg, storage)
    if not storage.exists(url):
        return None
    if force:
        storage.rm(url)
        return None
    print(f"dataset {url} is up to date: nothing to shard")
    return up_to_date_summary(ShardManifest.load(storage, url))


def group_key(plan: ShardPlan, index: int, continual: bool) -> str:
    """The content fingerprint of shard group `index`.

    By default it names the dataset version, so only the same dataset reuses a group. In continual mode it
    names the group's own samples and the sharding parameters, so a grown source reuses every shard whose
    samples did not change (from an earlier version's folder) and writes only the new ones.
    """
    group = plan.groups[index]
    if not continual:
        return fingerprint(plan.dataset_url, index)
    members = [(n, item.id, item.label) for n, item in group.items]
    return fingerprint(plan.storage.root, plan.name, plan.params, group.split, group.index, members)


@task(name="shard-group", task_run_name="shard {key:.8}", cache_key_fn=_key("shard-group"))
def shard_group(plan: ShardPlan, index: int, key: str) -> GroupResult:
    """Write one shard (group `index` of the plan); `key` is its content fingerprint (see group_key)."""
    return write_shard_group(plan, index)


def map_shard_groups(plan: ShardPlan, cfg: PipelineConfig, continual: bool, force: bool) -> list[GroupResult]:
    """Submit one shard-group task per group to the flow's task runner and wait for all of them."""
    runner = configured(shard_group, cfg, cfg.orchestration.shard, refresh=force)
    # Each task gets a plan of its own group only: Prefect walks every parameter before a task runs, and
    # the whole plan (every item of the dataset) per task made sharding Fashion-MNIST take minutes. Not
    # quote()d instead: Dask would hand the task the annotation's bare tuple.
    futures = [
        runner.submit(replace(plan, groups=[group], listing_rejects=[]), 0, group_key(plan, i, continual))
        for i, group in enumerate(plan.groups)
    ]
    return [future.result() for future in futures]


@task(name="commit-shards", cache_key_fn=_key("commit-shards"))
def commit_shards(cfg: PipelineConfig, plan: ShardPlan, results: list[GroupResult], key: str) -> dict:
    """Write the manifest (the commit point) from every group's result; publish the counts as artifacts."""
    summary = commit_manifest(cfg, plan, results)
    shard_artifacts(ShardManifest.load(plan.storage, summary.manifest), summary)
    return summary.model_dump()


def commit_key(plan: ShardPlan, results: Sequence[GroupResult]) -> str:
    return fingerprint(plan.manifest_url, [r.entry.sha256 if r.entry else None for r in results])


def up_to_date_summary(manifest: ShardManifest) -> dict:
    """The shard stage's summary for a dataset version that is already committed."""
    return ShardSummary(
        manifest=manifest.url,
        version=manifest.version,
        num_samples=manifest.num_samples,
        num_shards=len(manifest.shards),
        rejected=len(manifest.rejected),
        up_to_date=True,
    ).model_dump()


def shard_artifacts(manifest: ShardManifest, summary: ShardSummary) -> None:
    create_table_artifact(
        shard_rows(manifest),
        key=_artifact_key("shards", manifest.name),
        description=f"Dataset {manifest.name} {manifest.version}: {summary.manifest} "
        f"({summary.images_per_s} images/s)",
    )
    if manifest.rejected:
        create_table_artifact(
            [{"sample": r.id, "reason": r.reason} for r in manifest.rejected[:200]],
            key=_artifact_key("rejections", manifest.name),
            description=f"{len(manifest.rejected)} rejected samples (first 200)",
        )


# -- pretrain ---------------------------------------------------------------------------------------------


def pretrain_key(cfg: PipelineConfig, dataset: dict) -> str:
    """Dataset version x every config section that shapes the weights (launch topology does not)."""
    return fingerprint(
        cfg.storage.root, dataset["version"], _public(cfg, "model", "views", "loss", "pretrain", "seed")
    )


@task(name="pretrain", log_prints=True, cache_key_fn=_key("pretrain"))
def pretrain(cfg: PipelineConfig, dataset: dict, key: str) -> dict:
    """Launch training on every rank; rank logs stream into this task's log (print -> Prefect logger).

    A retry relaunches the same `pretrain.run_name`, which resumes from its latest checkpoint.
    """
    summary = run_pretrain(cfg)
    training_curves_artifact(cfg, summary)
    return {**summary, "dataset": dataset["version"]}


def training_curves_artifact(cfg: PipelineConfig, summary: dict) -> None:
    """The loss curves as a markdown table (about 20 evenly spaced steps) with a sparkline per column."""
    log = read_training_log(Storage.from_config(cfg.storage), run_url(cfg))
    if not log:
        return
    columns = [c for c in CURVES if c in log[0]]
    lines = [
        f"# Training curves of run `{cfg.pretrain.run_name}`",
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
    create_markdown_artifact(
        "\n".join(lines),
        key=_artifact_key("training-curves", cfg.pretrain.run_name),
        description=f"{summary.get('steps')} steps, final loss {summary.get('final_loss')}",
    )


# -- evaluate ---------------------------------------------------------------------------------------------


def evaluate_key(cfg: PipelineConfig, trained: dict) -> str:
    """The checkpoint the encoder came from x the evaluation settings."""
    return fingerprint(
        cfg.storage.root,
        {k: trained.get(k) for k in ("run_dir", "checkpoint", "steps", "final_loss", "dataset")},
        _public(cfg, "evaluate", "seed"),
    )


@task(name="evaluate", log_prints=True, cache_key_fn=_key("evaluate"))
def evaluate(cfg: PipelineConfig, trained: dict, key: str) -> dict:
    """Score the run's encoder and its baselines; the metrics table becomes an artifact."""
    summary = asdict(run_evaluate(cfg))
    storage = Storage.from_config(cfg.storage)
    metrics = storage.read_json(summary["metrics"])
    metrics_table_artifact(cfg, metrics)
    return {**summary, "metrics_sha256": sha256_of(storage, summary["metrics"])}


def metrics_table_artifact(cfg: PipelineConfig, metrics: dict) -> None:
    rows = []
    for model, scores in metrics.get("models", {}).items():
        row: dict[str, Any] = {"model": model}
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()})
        rows.append(row)
    create_table_artifact(
        rows,
        key=_artifact_key("metrics", cfg.pretrain.run_name),
        description=f"Frozen-feature evaluation of run {cfg.pretrain.run_name}: {metrics.get('run')}",
    )


# -- publish ----------------------------------------------------------------------------------------------


def publish_key(cfg: PipelineConfig, evaluated: dict, force: bool) -> str:
    """The metrics (whose content names the weights) x the publish settings x the force flag."""
    return fingerprint(cfg.storage.root, evaluated["metrics_sha256"], _public(cfg, "publish"), force)


@task(name="publish", log_prints=True, cache_key_fn=_key("publish"))
def publish(cfg: PipelineConfig, evaluated: dict, force: bool, key: str) -> dict:
    """Release the evaluated encoder; `latest` moves only through the gate (or with force).

    The run's report.html, which publishing rewrites with the release in it, is linked as an artifact.
    """
    summary = asdict(run_publish(cfg, force=force))
    create_link_artifact(
        link_url(summary["model_uri"]),
        link_text=f"{summary['version']} ({'promoted to latest' if summary['promoted'] else 'not promoted'})",
        key=_artifact_key("release", cfg.publish.name or cfg.pretrain.run_name),
        description=summary["reason"],
    )
    create_link_artifact(
        link_url(Storage.from_config(cfg.storage).url("runs", cfg.pretrain.run_name, HTML_REPORT)),
        link_text=f"{HTML_REPORT} of run {cfg.pretrain.run_name}",
        key=_artifact_key("report", cfg.pretrain.run_name),
        description="The run in one self-contained page: results, release, curves, dataset, config",
    )
    return summary


# -- upstream outputs read back from storage (single-stage runs) ------------------------------------------


def stored_dataset(cfg: PipelineConfig) -> dict:
    """The shard summary of the dataset a later stage would read (see lejepa.shard.locate_manifest)."""
    from lejepa.shard import locate_manifest

    storage = Storage.from_config(cfg.storage)
    return up_to_date_summary(ShardManifest.load(storage, locate_manifest(cfg, storage)))


def stored_pretrain(cfg: PipelineConfig) -> dict:
    """The pretrain summary the run `pretrain.run_name` left in storage."""
    storage = Storage.from_config(cfg.storage)
    url = f"{run_url(cfg)}/summary.json"
    if not storage.exists(url):
        raise FileNotFoundError(f"no finished run at {run_url(cfg)}: run the pretrain stage first")
    return storage.read_json(url)


def stored_evaluation(cfg: PipelineConfig) -> dict:
    """The evaluate summary of the run `pretrain.run_name`, from its metrics.json."""
    storage = Storage.from_config(cfg.storage)
    url = f"{run_url(cfg)}/{METRICS}"
    if not storage.exists(url):
        raise FileNotFoundError(f"no {METRICS} in {run_url(cfg)}: run the evaluate stage first")
    metrics = storage.read_json(url)
    return {
        "metrics": url,
        "linear_probe_top1": metrics.get("linear_probe_top1"),
        "knn_top1": metrics.get("knn_top1"),
        "metrics_sha256": sha256_of(storage, url),
    }
