"""Publish stage: a run's evaluated encoder becomes a versioned, checksummed model release.

Layout: `{root}/models/{name}/{version}/` holds `encoder.safetensors`, `encoder.json` (and
`projector.safetensors` when the run exported one), `metrics.json`, the evaluation figure, a model card
`README.md`, and `timm/` (config.json and model.safetensors: what `timm.create_model("local-dir:...")` loads,
see lejepa.publish.timm_release); `release.json` lists every file's sha256 and whether the release was
promoted, and why. With `publish.hf_repo` set, a promoted release's timm folder and card also go to that hub
repo (with the token in HF_TOKEN; without it, one warning line and no upload), before `release.json` is
written.

Commit order, so readers never see half a release: every file, then `release.json` (a folder without it is
incomplete), then `{root}/models/{name}/latest.json`, the pointer readers follow. A crash anywhere before
the pointer moves leaves `latest` on the previous complete release.

Promotion gate: the release becomes `latest` only if its linear-probe top-1 is at least
`publish.min_top1`, above the raw-pixel baseline of the same run (`publish.beat_raw_pixels`, on by
default, the first release included), and not below the current latest's (`--force` skips the gate).
A rejected release is kept, with `promoted: false` and the reason in its `release.json`. Unlabelled runs
have no top-1, so they are promoted only with `--force`.

Top-1 is compared with the latest's only when both were scored on the same test set (the same test-split
fingerprint, recorded by the evaluate stage). When the test sets differ, as they do whenever a recurring run
adds data, the numbers are not comparable: the release is then promoted on `publish.min_top1` alone, and
its reason says that it was not compared and why. Refusing instead would stop continual runs from ever
promoting without `--force`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lejepa.cli import config_from, one_line, run_stage, stage_parser
from lejepa.config import ConfigError, PipelineConfig, blank_credentials, redacted
from lejepa.evaluate.report import results_table, write_html_report
from lejepa.publish.timm_release import HF_TOKEN_ENV, timm_config, upload_release
from lejepa.store import layout
from lejepa.store.layout import (
    CARD,
    DESCRIPTION,
    FIGURE,
    METRICS,
    PROJECTOR,
    RELEASE,
    TIMM_CONFIG,
    TIMM_WEIGHTS,
    WEIGHTS,
)
from lejepa.store.lease import Lease
from lejepa.store.storage import Storage
from lejepa.tracking import Release, Tracker
from lejepa.train.export import load_encoder

# Fault injection for the crash-safety test: SIGKILL this process after N release files are written.
CRASH_AFTER_ENV = "LEJEPA_PUBLISH_CRASH_AFTER"


class PublishError(RuntimeError):
    """The run cannot be published as it is (not exported, not evaluated, stale metrics); says what to run."""


@dataclass
class PublishSummary:
    model_uri: str
    version: str
    promoted: bool
    reason: str


def release_version(weights_sha256: str, now: datetime | None = None) -> str:
    """`v{UTC YYYYmmdd-HHMMSS}-{8 hex of the weights' sha256}`: sorts by time, names the weights.

    `run_publish` appends `-2`, `-3`, ... in the rare case the folder is taken (same weights, same second).
    """
    now = now or datetime.now(timezone.utc)
    return f"v{now:%Y%m%d-%H%M%S}-{weights_sha256[:8]}"


def read_latest(storage: Storage, name: str) -> dict[str, Any] | None:
    """The `latest.json` pointer of model `name` ({version, model_uri, linear_probe_top1, ...}) or None."""
    url = layout.model_latest_url(storage, name)
    return storage.read_json(url) if storage.exists(url) else None


def resolve_model(storage: Storage, name: str, version: str = "latest") -> str:
    """URL of a complete release of model `name` (for `lejepa.load_encoder`); `latest` follows the pointer."""
    if version == "latest":
        latest = read_latest(storage, name)
        if latest is None:
            raise PublishError(f"model '{name}' has no promoted release in {layout.model_url(storage, name)}")
        return latest["model_uri"]
    url = layout.model_url(storage, name, version)
    if not storage.exists(f"{url}/{RELEASE}"):
        raise PublishError(f"no complete release {name}/{version} in {layout.model_url(storage, name)}")
    return url


def verify_release(storage: Storage, model_uri: str) -> dict[str, Any]:
    """The release's `release.json`, after checking every listed file against its sha256."""
    release = storage.read_json(f"{model_uri}/{RELEASE}")
    for name, entry in release["files"].items():
        if storage.sha256(f"{model_uri}/{name}") != entry["sha256"]:
            raise PublishError(f"{model_uri}/{name} does not match its sha256 in {RELEASE}: republish it")
    return release


def test_set_of(metrics: dict[str, Any]) -> str | None:
    """The fingerprint of the test split that `metrics` (an evaluate stage's metrics.json) was scored on."""
    return metrics["dataset"]["splits"].get("test", {}).get("fingerprint")


def promotion_decision(
    top1: float | None,
    min_top1: float,
    latest: dict[str, Any] | None,
    force: bool = False,
    test_set: str | None = None,
    raw_pixels: float | None = None,
) -> tuple[bool, str]:
    """(promote?, why) for a release with linear-probe `top1`, scored on the test set with fingerprint
    `test_set`, against the threshold, the raw-pixel baseline `raw_pixels` of the same run (None: not
    required, or not measured) and the current latest (compared only when scored on the same test set).
    """
    if force:
        return True, "forced (--force): promotion gate skipped"
    if top1 is None:
        return False, "no linear-probe top-1 (unlabelled data): promote it with --force"
    if top1 < min_top1:
        return False, f"linear-probe top-1 {top1:.4f} is below publish.min_top1 {min_top1:.4f}"
    if raw_pixels is not None and top1 <= raw_pixels:
        return False, (
            f"linear-probe top-1 {top1:.4f} does not beat raw pixels ({raw_pixels:.4f}) in the same run: "
            "train longer, or set publish.beat_raw_pixels=false"
        )
    pixels = f", > raw pixels {raw_pixels:.4f}" if raw_pixels is not None else ""
    if latest is None:
        return True, f"first release; linear-probe top-1 {top1:.4f} >= min_top1 {min_top1:.4f}{pixels}"
    best = latest.get("linear_probe_top1")
    theirs = latest.get("test_set")
    if test_set is None or theirs is None or test_set != theirs:
        why = (
            f"it was scored on a different test set ({test_set} vs {theirs})"
            if test_set and theirs
            else f"{'the latest' if theirs is None else 'this run'} recorded no test-set fingerprint"
        )
        return True, (
            f"linear-probe top-1 {top1:.4f} >= min_top1 {min_top1:.4f}{pixels}; not compared with latest "
            f"{latest['version']} ({_fmt(best)}): {why}, so the numbers are not comparable"
        )
    if best is not None and top1 < best:
        return False, f"linear-probe top-1 {top1:.4f} is worse than latest {latest['version']} ({best:.4f})"
    return True, (
        f"linear-probe top-1 {top1:.4f} >= latest {latest['version']} ({_fmt(best)}) and min_top1{pixels}"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def model_card(
    name: str,
    version: str,
    model_uri: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    promoted: bool,
    reason: str,
    with_figure: bool = True,
    timm_note: str | None = None,
    hf_repo: str | None = None,
) -> str:
    """The release's README.md: what it is, how good it is, how it was trained, how to load it (with lejepa,
    and with timm alone unless `timm_note` says why the release has no timm folder; from `hf_repo` too)."""
    d = metrics["dataset"]
    description = metrics["encoder"]["description"]
    splits = ", ".join(
        f"{role}: `{s['split']}` ({s['num_samples']} images)" for role, s in d["splits"].items()
    )
    return "\n".join(
        [
            f"# {name} {version}",
            "",
            f"A LeJEPA self-supervised image encoder: `{description['backbone']}`, {description['in_chans']} "
            f"channel(s), {description['img_size']} px inputs, {description['embed_dim']}-d embeddings.",
            f"Promoted to `latest`: {'yes' if promoted else 'no'} ({reason}).",
            "",
            "## Load it",
            "",
            "With lejepa, which resizes and normalises as in training:",
            "",
            "```python",
            "from lejepa.train.export import load_encoder",
            f'encoder = load_encoder("{model_uri}")',
            "embeddings = encoder(images)  # uint8 or [0, 1] float images (B, C, H, W) -> (B, D)",
            "```",
            "",
            *_timm_usage(model_uri, description["in_chans"], timm_note, hf_repo),
            "## Evaluation (frozen features, test split)",
            "",
            results_table(metrics),
            "",
            *([f"![training curves and evaluation]({FIGURE})", ""] if with_figure else []),
            *[f"- {key.replace('_', ' ')}: {text}" for key, text in metrics["protocol"].items()],
            "",
            "## Data",
            "",
            f"Dataset `{d['name']}` version `{d['version']}` ({splits}).",
            f"Manifest: `{d['manifest']}`; source fingerprint: `{d.get('fingerprint')}`; "
            f"test-set fingerprint: `{test_set_of(metrics)}`.",
            f"Encoder weights sha256: `{metrics['encoder']['sha256']}`.",
            "",
            "## Training config",
            "",
            "```json",
            json.dumps(config, indent=2),
            "```",
            "",
        ]
    )


def _evaluated_run(storage: Storage, run_url: str) -> tuple[dict[str, Any], str]:
    """The run's metrics.json and its weights' sha256, after checking the run was exported and evaluated."""
    for needed, stage in ((DESCRIPTION, "pretrain"), (WEIGHTS, "pretrain"), (METRICS, "evaluate")):
        if not storage.exists(f"{run_url}/{needed}"):
            raise PublishError(f"{run_url} has no {needed}: run `lejepa-pipeline {stage}` first")
    weights_sha256 = storage.sha256(f"{run_url}/{WEIGHTS}")
    metrics = storage.read_json(f"{run_url}/{METRICS}")
    if metrics.get("encoder", {}).get("sha256") != weights_sha256:
        raise PublishError(
            f"{run_url}/{METRICS} is for other weights than {WEIGHTS}: run `lejepa-pipeline evaluate` again"
        )
    return metrics, weights_sha256


def _free_version(storage: Storage, name: str, weights_sha256: str) -> tuple[str, str]:
    """(version, model_uri) of a release folder not taken yet (the caller holds the model's lease)."""
    version = base = release_version(weights_sha256)
    for attempt in itertools.count(2):  # the same weights published twice in one second get -2, -3, ...
        model_uri = layout.model_url(storage, name, version)
        if not storage.ls(model_uri):
            return version, model_uri
        version = f"{base}-{attempt}"
    raise AssertionError("unreachable")


def _timm_usage(model_uri: str, in_chans: int, timm_note: str | None, hf_repo: str | None) -> list[str]:
    """The model card's lines on loading the release with timm alone (or why it cannot be)."""
    if timm_note is not None:
        return [f"No `timm/` folder: {timm_note}.", ""]
    remote = "://" in model_uri
    # timm's transform keeps a PIL image's channels: a grey model needs grey images.
    image = 'image.convert("L")' if in_chans == 1 else "image"
    hub = [f'model = timm.create_model("hf-hub:{hf_repo}", pretrained=True).eval()  # or'] if hf_repo else []
    return [
        "With timm alone, from the release's `timm/` folder"
        + (" (copied to a local folder first)" if remote else "")
        + (f" or from the hub repo `{hf_repo}`" if hf_repo else "")
        + ":",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{model_uri}/timm", pretrained=True).eval()  # pooled features',
        *hub,
        "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
        f"features = model(transform({image}).unsqueeze(0))  # a PIL image",
        "```",
        "",
    ]


def _timm_config(storage: Storage, run_url: str) -> tuple[dict[str, Any] | None, str | None]:
    """The release's timm/config.json, or None and why the run's encoder is no timm model."""
    try:
        return timm_config(load_encoder(run_url, storage)), None
    except ValueError as exc:
        return None, str(exc)


def _write_files(
    storage: Storage, run_url: str, model_uri: str, card: str, timm: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Copy the run's files and write the model card (and the `timm` folder's config.json beside a copy of
    the weights) into the release folder; returns {file: sha256, bytes}.

    `LEJEPA_PUBLISH_CRASH_AFTER=N` SIGKILLs this process after N files (the crash-safety tests).
    """
    crash_after = int(os.environ.get(CRASH_AFTER_ENV, "0"))
    files: dict[str, dict[str, Any]] = {}
    copied = [WEIGHTS, DESCRIPTION, METRICS] + [
        optional for optional in (PROJECTOR, FIGURE) if storage.exists(f"{run_url}/{optional}")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        local_storage = Storage(tmp)
        (Path(tmp) / TIMM_CONFIG).parent.mkdir()
        for file_name in [*copied, *([TIMM_CONFIG, TIMM_WEIGHTS] if timm else []), CARD]:
            local = Path(tmp) / file_name
            if file_name == CARD:
                local.write_text(card)
            elif file_name == TIMM_CONFIG:
                local.write_text(json.dumps(timm, indent=2))
            elif file_name == TIMM_WEIGHTS:  # the backbone's tensors already have timm's names
                shutil.copyfile(Path(tmp) / WEIGHTS, local)
            else:
                storage.get_file(f"{run_url}/{file_name}", local)
            storage.put_file(local, f"{model_uri}/{file_name}")
            files[file_name] = {"sha256": local_storage.sha256(str(local)), "bytes": local.stat().st_size}
            if crash_after and len(files) >= crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
    return files


def _upload_to_hub(
    cfg: PipelineConfig, storage: Storage, model_uri: str, message: str, uploadable: bool
) -> str | None:
    """Upload the release's timm folder and card to publish.hf_repo (when set, and `uploadable`: promoted,
    with a timm folder); the repo's URL, or None. Without HF_TOKEN: one warning line, no upload."""
    repo = cfg.publish.hf_repo
    if repo is None or not uploadable:
        return None
    token = os.environ.get(HF_TOKEN_ENV)
    if not token:
        print(
            f"warning: publish.hf_repo={repo}: {HF_TOKEN_ENV} is not set, so the release is not uploaded: "
            f"set {HF_TOKEN_ENV} to a hub token with write access, or unset publish.hf_repo",
            file=sys.stderr,
            flush=True,
        )
        return None
    try:
        return upload_release(storage, model_uri, repo, token, message)
    except Exception as exc:  # a refused token, a missing permission, no network: the user's to fix
        raise PublishError(
            f"publish.hf_repo={repo}: the upload failed ({type(exc).__name__}: {one_line(exc)[:300]}): "
            f"check {HF_TOKEN_ENV} and the repo, or unset publish.hf_repo"
        ) from None


def run_publish(cfg: PipelineConfig, force: bool = False) -> PublishSummary:
    """Release the encoder of `{root}/runs/{pretrain.run_name}`; `latest` moves only if the gate allows.

    The model's lease (`models/{name}/lease.json`) is held from choosing the version to moving `latest`, so
    two publishers of one model cannot interleave.
    """
    storage = Storage.from_config(cfg.storage)
    run_url = layout.run_url(storage, cfg.pretrain.run_name)
    name = cfg.publish.name or cfg.pretrain.run_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"publish.name: '{name}' must be letters, digits, '.', '_' or '-' (no slashes)")
    metrics, weights_sha256 = _evaluated_run(storage, run_url)
    config_url = f"{run_url}/{layout.CONFIG}"
    config = blank_credentials(storage.read_json(config_url)) if storage.exists(config_url) else redacted(cfg)
    top1 = metrics.get("linear_probe_top1")
    test_set = test_set_of(metrics)
    pixels = metrics.get("models", {}).get("raw_pixels", {}).get("linear_probe_top1")
    raw_pixels = pixels if cfg.publish.beat_raw_pixels else None
    # What the top-1 was measured on: the gate of the next release compares against it.
    dataset = {"manifest": metrics["dataset"]["manifest"], "test_set": test_set}
    timm, timm_note = _timm_config(storage, run_url)

    with Lease(storage, layout.model_url(storage, name), "published"):
        latest = read_latest(storage, name)
        promoted, reason = promotion_decision(top1, cfg.publish.min_top1, latest, force, test_set, raw_pixels)
        version, model_uri = _free_version(storage, name, weights_sha256)
        with_figure = storage.exists(f"{run_url}/{FIGURE}")
        card = model_card(
            name,
            version,
            model_uri,
            metrics,
            config,
            promoted,
            reason,
            with_figure,
            timm_note,
            cfg.publish.hf_repo,
        )
        files = _write_files(storage, run_url, model_uri, card, timm)
        if files[WEIGHTS]["sha256"] != weights_sha256:
            raise PublishError(f"{run_url}/{WEIGHTS} changed while publishing: publish again")
        hub = _upload_to_hub(cfg, storage, model_uri, f"{name} {version}", promoted and timm is not None)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        release = {
            "name": name,
            "version": version,
            "model_uri": model_uri,
            "created": now,
            "run": run_url,
            "linear_probe_top1": top1,
            "knn_top1": metrics.get("knn_top1"),
            **dataset,
            "promoted": promoted,
            "reason": reason,
            "previous_latest": latest["version"] if latest else None,
            "hf_repo": hub,
            "files": files,
        }
        storage.write_json(f"{model_uri}/{RELEASE}", release)  # the release's commit point
        if promoted:
            pointer = {"version": version, "model_uri": model_uri, "linear_probe_top1": top1, **dataset}
            storage.write_json(layout.model_latest_url(storage, name), {**pointer, "updated": now})
    summary = PublishSummary(model_uri=model_uri, version=version, promoted=promoted, reason=reason)
    report_url = write_html_report(storage, run_url, metrics, asdict(summary))  # now with its release
    with Tracker.for_run(cfg, storage, run_url) as tracker:
        scores = {k: v for k in ("linear_probe_top1", "knn_top1") if (v := metrics.get(k)) is not None}
        files = {f: f"{model_uri}/{f}" for f in (CARD, DESCRIPTION, RELEASE)}
        tracker.record_release(Release(name, version, model_uri, promoted, reason, scores, files))
        tracker.log_artifact(f"{model_uri}/{CARD}")
        tracker.log_artifact(report_url)
    return summary


def cli(argv: list[str] | None = None) -> int:
    parser = stage_parser("lejepa-pipeline publish", __doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="promote to latest even if the gate refuses")
    args = parser.parse_args(argv)
    return run_stage(lambda: run_publish(config_from(args), force=args.force), PublishError)


if __name__ == "__main__":
    sys.exit(cli())
