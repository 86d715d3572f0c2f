"""Exported encoders load without the training code's config and give identical embeddings."""

import json

import torch

import lejepa
from lejepa.objective.model import Encoder
from lejepa.objective.views import eval_view
from lejepa.store.storage import Storage
from lejepa.train.export import encoder_description, export_encoder


def test_export_then_load_gives_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    encoder = Encoder("resnet18", in_chans=1, small_input=True, proj_hidden_dim=64).eval()
    mean, std = [0.3], [0.35]
    description = encoder_description("resnet18", {}, 1, 28, True, encoder.embed_dim, mean, std)
    storage = Storage(str(tmp_path))
    url = export_encoder(
        encoder.backbone, description, storage, str(tmp_path / "run"), projector=encoder.projector
    )

    loaded = lejepa.load_encoder(url)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = encoder.backbone(eval_view(images, 28, mean, std))
    assert not loaded.training
    assert torch.equal(loaded(images), expected)
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["small_input"] is True
    # The folder URL works as well as the JSON's, and no pickle is involved: the weights are safetensors.
    assert torch.equal(lejepa.load_encoder(str(tmp_path / "run"))(images), expected)
    assert (tmp_path / "run" / "encoder.safetensors").read_bytes()[:8] != b"\x80\x04\x95"
