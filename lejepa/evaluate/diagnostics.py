"""The evaluation's label-free diagnostics: how the embeddings are spread, and the training objective on
held-out images.

- `embedding_diagnostics`: RankMe and the SIGReg statistic of a model's test embeddings
  (`lejepa.evaluate.probes`).
- `heldout_losses`: the LeJEPA loss and its two parts on multi-crop views of held-out (test) images, for
  each model with the run's exported projector; skipped when the run exported none.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from lejepa.config import PipelineConfig
from lejepa.data.manifest import ShardManifest
from lejepa.evaluate.features import ENCODER, first_images
from lejepa.evaluate.probes import effective_rank, sigreg_statistic
from lejepa.objective.loss import lejepa_loss
from lejepa.objective.model import Encoder
from lejepa.objective.sigreg import SIGReg
from lejepa.objective.views import MultiCropViews
from lejepa.store.layout import PROJECTOR
from lejepa.store.storage import Storage
from lejepa.train.export import FrozenEncoder, rebuild_backbone


def embedding_diagnostics(embeddings: Tensor, cfg: PipelineConfig) -> dict[str, float]:
    return {
        "rankme": effective_rank(embeddings),
        "sigreg": sigreg_statistic(embeddings, cfg.loss.num_slices, cfg.loss.knots, cfg.loss.t_max, cfg.seed),
    }


def heldout_lejepa_loss(
    encoder: Encoder, images: Tensor, views: MultiCropViews, cfg: PipelineConfig, batch_size: int
) -> dict[str, float]:
    """The LeJEPA loss (and its parts) of held-out images under the training views, seeded, averaged over
    batches of the training batch size (SIGReg's value depends on the batch size).

    Runs where `encoder`, `images` and `views` are; the views and SIGReg's slices are drawn by a generator
    on that device, so each device's number is reproducible, but a CPU and a GPU draw different views.
    """
    sigreg = SIGReg(cfg.loss.num_slices, cfg.loss.knots, cfg.loss.t_max, seed=cfg.seed)
    generator = torch.Generator(device=images.device).manual_seed(cfg.seed)
    # Summed on the device: reading each batch's loss would wait for the device every batch.
    sums = torch.zeros(3, dtype=torch.float64, device=images.device)
    batches = images.split(batch_size)
    with torch.no_grad():
        for batch in batches:
            global_views, local_views = views(batch, generator)
            _, projections = encoder.forward_views(global_views, local_views)
            loss = lejepa_loss(projections, global_views.shape[0], sigreg, cfg.loss.lamb)
            sums += torch.stack([loss.total, loss.prediction, loss.sigreg]).double()
    total, prediction, regulariser = (sums / len(batches)).tolist()
    return {"lejepa_loss": total, "lejepa_prediction": prediction, "lejepa_sigreg": regulariser}


def heldout_losses(
    cfg: PipelineConfig,
    storage: Storage,
    run_url: str,
    manifest: ShardManifest,
    split: str,
    encoders: dict[str, FrozenEncoder],
    device: torch.device,
) -> dict[str, dict[str, float]] | None:
    """The held-out LeJEPA loss of each encoder with the run's projector (the random-init encoder gets a
    random one, as the same architecture at initialisation), on `device`; None when the run exported no
    projector."""
    projector_url = f"{run_url}/{PROJECTOR}"
    description = encoders[ENCODER].description
    if "projector" not in description or not storage.exists(projector_url):
        return None
    e = cfg.evaluate
    heldout = first_images(manifest, storage, split, e.diagnostic_samples, e.batch_size).to(device)
    views = MultiCropViews.from_config(
        cfg.views, manifest.longer_side, description["in_chans"], description["mean"], description["std"]
    ).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        storage.get_file(projector_url, Path(tmp) / PROJECTOR)
        projector_state = load_file(str(Path(tmp) / PROJECTOR))
    losses = {}
    for name, frozen in encoders.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = _full_encoder(frozen, projector_state if name == ENCODER else None).to(device)
        losses[name] = heldout_lejepa_loss(model, heldout, views, cfg, cfg.pretrain.batch_size)
    return losses


def _full_encoder(frozen: FrozenEncoder, projector_state: dict[str, Tensor] | None) -> Encoder:
    """Backbone + projector with the exported weights (the projector random when there is none)."""
    encoder = rebuild_backbone(frozen.description, with_projector=True)
    encoder.backbone.load_state_dict(frozen.backbone.state_dict())
    if projector_state is not None:
        encoder.projector.load_state_dict(projector_state)
    return encoder.eval()
