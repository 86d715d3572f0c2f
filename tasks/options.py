"""How every task is configured: its cache key, its retries and timeout, and where its result persists.

A cache key is a fingerprint of the content a task depends on (the dataset version, which hashes the
source and the sharding parameters; the config sections that shape the result; the checkpoint or metrics
it consumes), so a rerun after a failure skips every stage that already finished. Secrets never enter a
key: config sections are taken as their JSON dump, which masks them (rotating credentials keeps caches).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.settings import get_current_settings

from lejepa.config import PipelineConfig, StagePolicy
from lejepa.data.shard import GroupResult, ShardPlan
from lejepa.store import layout
from lejepa.store.storage import Storage
from tasks.results import LocalResults, PlainJSON, StoreResults

_SAVED_BLOCKS: dict[tuple[str, str], LocalResults | StoreResults] = {}  # (API server, name): saved once each


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-able parts (the building block of every cache key)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def public_sections(cfg: PipelineConfig, *sections: str) -> dict[str, Any]:
    """The named config sections as JSON, secrets masked."""
    tree = cfg.model_dump(mode="json")
    return {name: tree[name] for name in sections}


def result_storage(cfg: PipelineConfig) -> LocalResults | StoreResults:
    """Where task results (and so the cache) persist: `{storage.root}/prefect-results`, as plain JSON only
    (`tasks.results`).

    Prefect takes only a block saved in its database (saved once per process and API server). It holds the
    folder, and for a remote store only the endpoint and the region, never a secret. The block returned
    writes through the store's own filesystem, with the config's credentials and options; one loaded from
    the database elsewhere uses that machine's AWS chain.
    """
    storage = Storage.from_config(cfg.storage)
    url = layout.results_url(storage)
    settings: dict[str, Any] = {}
    if cfg.storage.endpoint_url:
        settings["endpoint_url"] = cfg.storage.endpoint_url
    if cfg.storage.region:
        settings["client_kwargs"] = {"region_name": cfg.storage.region}
    name = f"lejepa-results-{fingerprint(url, settings)[:12]}"
    server = str(get_current_settings().api.url)
    block = _SAVED_BLOCKS.get((server, name))
    if block is None:
        local = storage.protocol == "file"
        block = LocalResults(basepath=url) if local else StoreResults(basepath=url, settings=settings)
        block.save(name, overwrite=True)
        _SAVED_BLOCKS[(server, name)] = block
    if isinstance(block, StoreResults):
        block._filesystem = storage.fs  # the block's fsspec cache: set, it is never built from settings
    return block


def configured(stage_task: Task, cfg: PipelineConfig, policy: StagePolicy, refresh: bool = False) -> Task:
    """`stage_task` with the retries, delay and timeout of `policy`; a cached task also persists its result
    to the store, as plain JSON (an uncached one, such as a plan of every sample, is never written
    anywhere)."""
    options: dict[str, Any] = {"persist_result": False}
    if stage_task.cache_policy is not NO_CACHE:
        options = {
            "result_storage": result_storage(cfg),
            "result_serializer": PlainJSON(),
            "refresh_cache": refresh,
        }
    return stage_task.with_options(
        retries=policy.retries,
        retry_delay_seconds=policy.retry_delay_s,
        timeout_seconds=policy.timeout_s,
        **options,
    )


def key_parameter(name: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A cache_key_fn that reads the key the caller computed into the task's `key` parameter."""

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return f"{name}-{parameters['key']}"

    return cache_key


# -- each stage's key -------------------------------------------------------------------------------------


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


def commit_key(plan: ShardPlan, results: Sequence[GroupResult]) -> str:
    return fingerprint(plan.manifest_url, [r.entry.sha256 if r.entry else None for r in results])


def pretrain_key(cfg: PipelineConfig, dataset: dict) -> str:
    """Dataset version x every config section that shapes the weights (launch topology does not)."""
    sections = public_sections(cfg, "model", "views", "loss", "pretrain", "seed")
    return fingerprint(cfg.storage.root, dataset["version"], sections)


def evaluate_key(cfg: PipelineConfig, trained: dict) -> str:
    """The checkpoint the encoder came from x the evaluation settings."""
    return fingerprint(
        cfg.storage.root,
        {k: trained.get(k) for k in ("run_dir", "checkpoint", "steps", "final_loss", "dataset")},
        public_sections(cfg, "evaluate", "seed"),
    )


def publish_key(cfg: PipelineConfig, evaluated: dict, force: bool) -> str:
    """The metrics (whose content names the weights) x the publish settings x the force flag."""
    return fingerprint(cfg.storage.root, evaluated["metrics_sha256"], public_sections(cfg, "publish"), force)
