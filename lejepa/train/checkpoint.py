"""Resumable training state in the run folder, on any storage.

`CheckpointManager` owns every stateful part of a run (the DeepSpeed engine with the model, SIGReg's step,
optimizer and scheduler; the data position; each rank's RNG; the online probe; the step and the seconds
trained) and the checks before a commit: nothing non-finite is ever committed. `CheckpointStore` owns the
files.

Layout under `{run}/checkpoints/`: one folder per tag (`step00000100/`, DeepSpeed's own files) and
`latest.json`, the commit point, written by rank 0 only after every rank's files are complete in storage.
A crash while saving leaves `latest.json` on the previous checkpoint, so a restart never loads a torn one.

DeepSpeed reads and writes local files, so for remote roots (s3://) each node saves into a local staging
folder and its first rank uploads it; resuming downloads the tag before loading.

Nothing read from the store runs as code: DeepSpeed unpickles checkpoint files with
`torch.load(weights_only=False)`, which would let whoever can write to the store run code on every rank.
Resuming reads them with `weights_only=True` instead: tensors, plain data and the few DeepSpeed types in
`_deepspeed_types`, nothing else.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from lejepa.store.layout import LATEST, checkpoints_url
from lejepa.store.storage import Storage

if TYPE_CHECKING:
    from lejepa.data.stream import TrainStream
    from lejepa.train.online_probe import OnlineProbe


class CheckpointError(RuntimeError):
    """A checkpoint resuming cannot or will not load; deleting the run's checkpoints restarts the run."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is left as the latest."""


def _deepspeed_types() -> list[type]:
    """The non-builtin types in DeepSpeed's checkpoints (ZeRO 0, 2 and 3, fp32 and bf16), as saved by 0.19."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # LossScaler: the (static, 1.0) loss scale of the ZeRO optimizers' state; ZeroStageEnum: the stage that
    # wrote their state; fragment_address: where each parameter lies in a ZeRO-2 partition (numel, start).
    return [LossScaler, ZeroStageEnum, fragment_address]


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class CheckpointStore:
    """Saves and restores a DeepSpeed engine under `{run_url}/checkpoints`, committing with `latest.json`."""

    def __init__(self, storage: Storage, run_url: str, keep: int = 2) -> None:
        self.storage = storage
        self.url = checkpoints_url(run_url)
        self.keep = keep
        self.local_dir = storage.local_dir(self.url)
        self.remote = storage.protocol != "file"

    def latest(self) -> dict[str, Any] | None:
        """The committed checkpoint's marker ({"tag", "step"}), or None when the run has none yet."""
        marker = f"{self.url}/{LATEST}"
        return self.storage.read_json(marker) if self.storage.exists(marker) else None

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> str:
        """Save on every rank (collective); returns the tag once `latest.json` points at it."""
        tag = f"step{step:08d}"
        self.local_dir.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.local_dir), tag=tag, client_state=client_state, save_latest=False)
        _barrier()
        if self.remote and _local_rank() == 0:
            for path in sorted((self.local_dir / tag).rglob("*")):
                if path.is_file():
                    self.storage.put_file(
                        path, f"{self.url}/{tag}/{path.relative_to(self.local_dir / tag).as_posix()}"
                    )
        _barrier()
        if _is_rank0():
            previous = self.latest()
            self.storage.write_json(f"{self.url}/{LATEST}", {"tag": tag, "step": step})
            self._prune(keep_tags={tag} | ({previous["tag"]} if previous else set()))
        _barrier()
        return tag

    def load(self, engine: Any) -> dict[str, Any] | None:
        """Load the latest committed checkpoint into `engine` (collective); returns its client state."""
        marker = self.latest()
        if marker is None:
            return None
        tag = marker["tag"]
        if self.remote and _local_rank() == 0:
            target = self.local_dir / tag
            for url in self.storage.find(f"{self.url}/{tag}"):
                relative = url.split(f"/{tag}/", 1)[1]
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                self.storage.get_file(url, target / relative)
        _barrier()
        if engine.load_universal_checkpoint():  # DeepSpeed reads those with pickle, past the hook below
            raise CheckpointError(
                "pretrain.deepspeed_config sets checkpoint.load_universal, which DeepSpeed loads with "
                "pickle: remove it"
            )
        with self._weights_only(engine):
            _, client_state = engine.load_checkpoint(str(self.local_dir), tag=tag)
        if client_state is None:
            raise CheckpointError(
                f"checkpoint {self.url}/{tag} could not be loaded: delete {self.url} to restart the run"
            )
        return client_state

    @contextlib.contextmanager
    def _weights_only(self, engine: Any) -> Iterator[None]:
        # DeepSpeed reads every file of a checkpoint through `engine.checkpoint_engine.load`: while resuming,
        # that one method of this engine's instance is ours.
        checkpoint_engine = engine.checkpoint_engine
        checkpoint_engine.load = self._load_file
        try:
            yield
        finally:
            del checkpoint_engine.load

    def _load_file(self, path: str, map_location: Any = None) -> Any:
        """torch.load that builds tensors, plain data and the DeepSpeed types allowed, and nothing else."""
        try:
            with torch.serialization.safe_globals(_deepspeed_types()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = found.group(1) if found else str(exc).splitlines()[-1]
            url = f"{self.url}/{os.path.relpath(path, self.local_dir)}"
            raise CheckpointError(
                f"checkpoint {url} holds objects that are not plain tensors and data ({what}): it was not "
                f"written by this version of the pipeline; delete {self.url} to restart the run"
            ) from None

    def _prune(self, keep_tags: set[str]) -> None:
        # Keep the newest `keep` tags (and whatever the marker moved from) so a crash mid-save still has one.
        tags = sorted(
            name.rstrip("/").rsplit("/", 1)[-1]
            for name in self.storage.ls(self.url)
            if "step" in name.rsplit("/", 1)[-1]
        )
        keep_tags |= set(tags[-self.keep :])
        for tag in tags:
            if tag not in keep_tags:
                self.storage.rm(f"{self.url}/{tag}", recursive=True)
                if self.remote:
                    shutil.rmtree(self.local_dir / tag, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as plain lists and tensors: checkpoints
    load with weights_only=True, which refuses numpy arrays."""
    generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [generator, key.tolist(), pos, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def weights_finite(engine: Any) -> bool:
    """Whether every rank's parameters (its ZeRO-3 partition, where parameters are partitioned) are finite."""
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    device = next(engine.module.parameters()).device
    flags = [t.isfinite().all() for t in params if t.numel()]
    finite = torch.stack(flags).all().float() if flags else torch.ones((), device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


class CheckpointManager:
    """Every stateful part of a training run, committed and restored together (collectives: every rank).

    `step` and `trained_s` are the run's position, advanced by the loop. `verify` checks a batch of step
    records and the weights; `commit` saves only a verified step, verifying it first if need be.
    """

    def __init__(
        self, store: CheckpointStore, engine: Any, stream: TrainStream, probe: OnlineProbe | None
    ) -> None:
        self.store, self.engine, self.stream, self.probe = store, engine, stream, probe
        self.step, self.trained_s = 0, 0.0
        self.tag = ""  # the committed checkpoint, "" before the first
        self._verified_step = -1

    def restore(self) -> bool:
        """Load the latest committed checkpoint into every part; False when the run has none yet."""
        state = self.store.load(self.engine)
        if state is None:
            return False
        self.step, self.trained_s = state["step"], state.get("trained_s", 0.0)
        self.stream.load_state_dict(state["data"])
        rngs, rank = state["rng"], dist.get_rank()
        set_rng_state(rngs[rank] if len(rngs) == dist.get_world_size() else rngs[0])
        if self.probe is not None and state.get("probe"):
            self.probe.load_state_dict(state["probe"])
        self.tag = self.store.latest()["tag"]
        return True

    def verify(self, records: list[dict[str, Any]]) -> None:
        """Raise TrainingDiverged, on every rank alike, if a record's loss or any weight is not finite."""
        losses = ("loss", "prediction", "sigreg")
        bad = next((r for r in records if not all(math.isfinite(r[k]) for k in losses)), None)
        if bad is None and weights_finite(self.engine):
            self._verified_step = self.step
            return
        what = (
            f"loss is {bad['loss']} at step {bad['step']}"
            if bad
            else f"weights are not finite at step {self.step}"
        )
        raise TrainingDiverged(
            f"{what}: lower pretrain.lr or raise loss.lamb; "
            f"the last good checkpoint ({self.tag or 'none'}) stays the latest"
        )

    def commit(self) -> str:
        """Save every part at the current step and make it the latest checkpoint; returns its tag."""
        if self._verified_step != self.step:
            self.verify([])
        rngs: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
        state = {
            "step": self.step,
            "data": self.stream.state_dict(),
            "rng": rngs,
            "probe": self.probe.state_dict() if self.probe else None,
            "trained_s": self.trained_s,
        }
        self.tag = self.store.save(self.engine, self.step, state)
        return self.tag
