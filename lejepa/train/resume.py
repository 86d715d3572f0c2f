"""What a run may resume under: the settings its checkpoint was trained with.

A run resumes only under the model, views and loss sections it was checkpointed with, on the same dataset
manifest, and under what fixes the data order (seed, batch size, loader workers and number of ranks), as
the run's config.json records them; anything else is refused, naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from lejepa.config import ConfigError

RESUME_SECTIONS = ("model", "views", "loss")
"""Config sections a checkpoint's weights and optimizer state were trained under."""
DATA_ORDER = ("data.manifest", "seed", "pretrain.batch_size", "pretrain.num_workers", "world_size")
"""What fixes each sample's place in the data order (a checkpoint's data position counts batches per rank
and loader worker): resuming under other values would see some samples of the epoch twice and skip others."""
_ABSENT = object()


class ResumeRefused(ConfigError):
    """A run cannot resume under settings other than those its checkpoint was trained with."""


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _ABSENT
        tree = tree[key]
    return tree


def check_resume(run_url: str, stored: dict[str, Any], launched: dict[str, Any]) -> None:
    """Refuse to resume run `run_url` when this launch's record (its config.json) differs from the stored one
    in a field the checkpoint depends on: ResumeRefused, one line naming the field, both values and the fix.

    A field one side lacks (added to or removed from the config since the run started) is not compared.
    """
    fields = [f"{section}.{key}" for section in RESUME_SECTIONS for key in stored.get(section) or {}]
    for name in [*fields, *DATA_ORDER]:
        old, new = _lookup(stored, name), _lookup(launched, name)
        if old is _ABSENT or new is _ABSENT or old == new:
            continue
        if name == "world_size":
            was, now = f"{old} ranks", f"{new}"
            fix = f"the original launch.nproc_per_node (and number of nodes), {old} ranks in all"
        else:
            was, now = f"{name}={json.dumps(old)}", json.dumps(new)
            fix = f"the original {name}={json.dumps(old)}"
        raise ResumeRefused(
            f"run {run_url} was checkpointed with {was}, this launch has {now}: resume it with {fix}, or "
            "start a new run with another pretrain.run_name"
        )
