"""Exported encoders: the backbone's weights as safetensors plus a JSON description to rebuild it.

`encoder.json` holds everything needed to turn images into embeddings without this run's config:
timm name and kwargs, input channels and size, the small-input stem flag, and the normalisation.
Loading never unpickles anything, so a file from a bucket cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lejepa.objective.model import Encoder, create_backbone
from lejepa.objective.views import eval_view
from lejepa.store.errors import DataError
from lejepa.store.layout import DESCRIPTION, PROJECTOR, RELEASE, WEIGHTS
from lejepa.store.storage import Storage


class FrozenEncoder(nn.Module):
    """Images (B, C, H, W), uint8 or float in [0, 1], at any size -> embeddings (B, D). Eval mode."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, description: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.description = description
        self.img_size: int = description["img_size"]
        self.embed_dim: int = description["embed_dim"]
        # Buffers follow the module to its device, so a batch on a GPU needs no blocking host-to-device copy
        # of the statistics; non-persistent: they come from the description, not the weights file.
        for name in ("mean", "std"):
            self.register_buffer(name, torch.tensor(description[name], dtype=torch.float32), persistent=False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        view = eval_view(images, self.img_size, self.mean, self.std)
        return self.backbone(view.contiguous(memory_format=torch.channels_last))  # see Encoder.forward_views


def encoder_description(
    backbone: str,
    backbone_kwargs: dict[str, Any],
    in_chans: int,
    img_size: int,
    small_input: bool,
    embed_dim: int,
    mean: list[float],
    std: list[float],
    projector: dict[str, int] | None = None,
) -> dict[str, Any]:
    """What `rebuild_backbone` needs to rebuild the backbone; `projector` holds the projector's dimensions."""
    return {
        "format": "lejepa-encoder/1",
        "backbone": backbone,
        "backbone_kwargs": backbone_kwargs,
        "in_chans": in_chans,
        "img_size": img_size,
        "small_input": small_input,
        "embed_dim": embed_dim,
        "mean": list(mean),
        "std": list(std),
        **({"projector": projector} if projector else {}),
    }


def rebuild_backbone(description: dict[str, Any], with_projector: bool = False) -> nn.Module:
    """The backbone an `encoder.json` describes, freshly initialised (its weights are loaded next); with
    `with_projector`, the training `Encoder` (that backbone, then the projector the description records).

    The one reader of the description's architecture: `load_encoder`, the evaluation's random-init baseline
    and its held-out loss all rebuild through it.
    """
    architecture = {
        "in_chans": description["in_chans"],
        "img_size": description["img_size"],
        "small_input": description["small_input"],
        **description["backbone_kwargs"],
    }
    if with_projector:
        return Encoder(description["backbone"], **architecture, **description["projector"])
    return create_backbone(description["backbone"], **architecture)


def _save_safetensors(module: nn.Module, storage: Storage, url: str) -> None:
    state = {
        name: t.detach().to("cpu", torch.float32).contiguous() for name, t in module.state_dict().items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "weights.safetensors"
        save_file(state, str(local), metadata={"format": "pt"})
        storage.put_file(local, url)


def export_encoder(
    backbone: nn.Module,
    description: dict[str, Any],
    storage: Storage,
    folder_url: str,
    projector: nn.Module | None = None,
) -> str:
    """Write `encoder.safetensors` (and `projector.safetensors`), then `encoder.json`; returns the JSON's URL.

    The projector is kept for the label-free diagnostics (the LeJEPA loss of held-out data); embeddings
    for downstream use come from the backbone alone.
    """
    _save_safetensors(backbone, storage, f"{folder_url}/{WEIGHTS}")
    if projector is not None:
        _save_safetensors(projector, storage, f"{folder_url}/{PROJECTOR}")
    # The description goes last: its presence says the weights beside it are complete.
    storage.write_json(f"{folder_url}/{DESCRIPTION}", description)
    return f"{folder_url}/{DESCRIPTION}"


def _folder(url: str, storage: Storage | None) -> tuple[str, Storage]:
    """The export folder of `url` (the folder or its `encoder.json`), and a Storage bound to it."""
    folder = url[: -len(DESCRIPTION) - 1] if url.endswith(DESCRIPTION) else url.rstrip("/")
    return folder, storage.at(folder) if storage is not None else Storage(folder)


def _check_release(storage: Storage, folder: str, digests: dict[str, str]) -> None:
    """Refuse files whose sha256 differs from the folder's release.json; a folder without one passes."""
    if not storage.exists(f"{folder}/{RELEASE}"):
        return
    files = storage.read_json(f"{folder}/{RELEASE}")["files"]
    for name, digest in digests.items():
        if files.get(name, {}).get("sha256") != digest:
            raise DataError(
                f"{folder}/{name} does not match its sha256 in {RELEASE}: it was changed after publishing; "
                "restore it or publish the run again"
            )


def load_encoder(
    url: str, storage: Storage | None = None, device: str | torch.device = "cpu"
) -> FrozenEncoder:
    """Load an exported encoder from its folder (or its `encoder.json`), local or remote, in eval mode.

    `storage` carries credentials for remote URLs; by default they come from the AWS environment.
    From a release folder, the files it reads must match their sha256 in `release.json` (else DataError,
    naming the file); a run folder has no release.json, and its files are not checksummed.
    """
    folder, storage = _folder(url, storage)
    try:
        raw_description = storage.read_bytes(f"{folder}/{DESCRIPTION}")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no exported encoder at {folder}: expected {DESCRIPTION} from a finished run or a release"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / WEIGHTS
        storage.get_file(f"{folder}/{WEIGHTS}", local)
        digests = {
            DESCRIPTION: hashlib.sha256(raw_description).hexdigest(),
            WEIGHTS: Storage(tmp).sha256(str(local)),
        }
        _check_release(storage, folder, digests)
        state = load_file(str(local))
    description = json.loads(raw_description)
    backbone = rebuild_backbone(description)
    backbone.load_state_dict(state, strict=True)
    return FrozenEncoder(backbone, description).to(device)


def warm_start(encoder: nn.Module, url: str, storage: Storage | None = None) -> None:
    """Copy an exported encoder's weights (backbone, and projector when exported) into a training Encoder.

    The architectures must match: a mismatch fails with the names of the differing tensors.
    """
    folder, storage = _folder(url, storage)
    if not storage.exists(f"{folder}/{WEIGHTS}"):
        raise FileNotFoundError(f"pretrain.init_from: no {WEIGHTS} at {folder}: point it at a release folder")
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in ((WEIGHTS, encoder.backbone), (PROJECTOR, encoder.projector)):
            if name == PROJECTOR and not storage.exists(f"{folder}/{name}"):
                continue  # a backbone-only export: the projector starts fresh
            storage.get_file(f"{folder}/{name}", Path(tmp) / name)
            try:
                module.load_state_dict(load_file(str(Path(tmp) / name)), strict=True)
            except RuntimeError as exc:
                raise ValueError(
                    f"pretrain.init_from: {folder}/{name} does not fit model.* of this run: "
                    f"{str(exc).splitlines()[0]}"
                ) from None
