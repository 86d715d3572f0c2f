"""One Prefect task per pipeline step: each calls one `lejepa` function and records its artifacts.

Every task is idempotent, and cached on a fingerprint of what it depends on (`tasks.options`), with its
result persisted under `{storage.root}/prefect-results`, so a rerun after a failure skips every stage that
already finished. Retries, retry delays and timeouts come from `orchestration.*` through `configured(...)`.
Each task is a plain callable too: `task.fn(...)`.

Secrets never leave the config object: summaries, artifacts, parameters (whose JSON masks them) and the
ranks' config file hold no credentials and no secret storage.options (the ranks get them through their
environment, see lejepa.train.pretrain).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lejepa.config import PipelineConfig
from lejepa.data.manifest import ShardManifest
from lejepa.data.shard import (
    GroupResult,
    ShardPlan,
    commit_manifest,
    committed_dataset,
    plan_shards,
    stored_dataset,
    write_shard_group,
)
from lejepa.evaluate.stage import evaluated_run, run_evaluate
from lejepa.publish.stage import read_latest, run_publish
from lejepa.store.storage import Storage
from lejepa.train.pretrain import finished_run, run_pretrain
from tasks.artifacts import (
    metrics_artifact,
    release_artifacts,
    shard_artifacts,
    tracker_artifacts,
    training_curves_artifact,
)
from tasks.options import key_parameter

# -- shard ------------------------------------------------------------------------------------------------


@task(name="check-dataset", cache_policy=NO_CACHE, log_prints=True)
def check_dataset(cfg: PipelineConfig, force: bool) -> dict | None:
    """The summary of `cfg`'s dataset when it is already committed, else None (to be sharded)."""
    summary = committed_dataset(cfg, force)
    if summary is None:
        return None
    print(f"dataset {summary.manifest} is up to date: nothing to shard")
    return summary.model_dump()


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan(cfg: PipelineConfig) -> ShardPlan:
    """List the source and cut it into shard groups (deterministic: a retry plans the same groups)."""
    return plan_shards(cfg)


@task(name="shard-group", task_run_name="shard {key:.8}", cache_key_fn=key_parameter("shard-group"))
def shard_group(plan: ShardPlan, index: int, key: str) -> dict:
    """Write one shard (group `index` of the plan); `key` is its content fingerprint (see group_key).
    Returns the `GroupResult` as JSON values: a cached result is plain JSON (see tasks.results)."""
    return write_shard_group(plan, index).to_json()


@task(name="commit-shards", cache_key_fn=key_parameter("commit-shards"))
def commit_shards(cfg: PipelineConfig, plan: ShardPlan, results: list[GroupResult], key: str) -> dict:
    """Write the manifest (the commit point) from every group's result; publish the counts as artifacts."""
    summary = commit_manifest(cfg, plan, results)
    shard_artifacts(ShardManifest.load(plan.storage, summary.manifest), summary)
    return summary.model_dump()


@task(name="read-dataset", cache_policy=NO_CACHE)
def read_dataset(cfg: PipelineConfig) -> dict:
    """The shard summary of the dataset a later stage would read (lejepa.data.manifest.locate_manifest)."""
    return stored_dataset(cfg).model_dump()


# -- pretrain ---------------------------------------------------------------------------------------------


@task(name="pretrain", log_prints=True, cache_key_fn=key_parameter("pretrain"))
def pretrain(cfg: PipelineConfig, dataset: dict, key: str) -> dict:
    """Launch training on every rank; rank logs stream into this task's log (print -> Prefect logger).

    A retry relaunches the same `pretrain.run_name`, which resumes from its latest checkpoint.
    """
    summary = run_pretrain(cfg)
    storage = Storage.from_config(cfg.storage)
    training_curves_artifact(storage, cfg.pretrain.run_name, summary)
    tracker_artifacts(storage, cfg.pretrain.run_name)
    return {**summary, "dataset": dataset["version"]}


@task(name="read-run", cache_policy=NO_CACHE)
def read_run(cfg: PipelineConfig) -> dict:
    """The pretrain summary the run `pretrain.run_name` left in storage."""
    return finished_run(cfg)


@task(name="latest-release", cache_policy=NO_CACHE)
def latest_release(cfg: PipelineConfig, name: str) -> dict[str, Any] | None:
    """The `latest.json` pointer of model `name`, or None before its first promoted release."""
    return read_latest(Storage.from_config(cfg.storage), name)


# -- evaluate ---------------------------------------------------------------------------------------------


@task(name="evaluate", log_prints=True, cache_key_fn=key_parameter("evaluate"))
def evaluate(cfg: PipelineConfig, trained: dict, key: str) -> dict:
    """Score the run's encoder and its baselines; the metrics table becomes an artifact."""
    summary = asdict(run_evaluate(cfg))
    storage = Storage.from_config(cfg.storage)
    metrics_artifact(cfg.pretrain.run_name, storage.read_json(summary["metrics"]))
    tracker_artifacts(storage, cfg.pretrain.run_name)  # the trackers' runs, where training did not reach them
    return {**summary, "metrics_sha256": storage.sha256(summary["metrics"])}


@task(name="read-evaluation", cache_policy=NO_CACHE)
def read_evaluation(cfg: PipelineConfig) -> dict:
    """The evaluate summary of the run `pretrain.run_name`, from its metrics.json."""
    return evaluated_run(cfg)


# -- publish ----------------------------------------------------------------------------------------------


@task(name="publish", log_prints=True, cache_key_fn=key_parameter("publish"))
def publish(cfg: PipelineConfig, evaluated: dict, force: bool, key: str) -> dict:
    """Release the evaluated encoder; `latest` moves only through the gate (or with force)."""
    summary = asdict(run_publish(cfg, force=force))
    name = cfg.publish.name or cfg.pretrain.run_name
    release_artifacts(Storage.from_config(cfg.storage), cfg.pretrain.run_name, name, summary)
    return summary
