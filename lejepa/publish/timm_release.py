"""A release's `timm/` folder, which `timm.create_model("local-dir:<release>/timm", pretrained=True)` loads,
and its upload to the Hugging Face Hub.

`timm/config.json` is timm's own description of a model: `architecture` (the timm name), `model_args` (what
`timm.create_model` was given to build the backbone: in_chans, img_size and dynamic_img_size for a ViT, and
model.backbone_kwargs) and `pretrained_cfg` (the input size, bilinear resize without crop, the dataset's
mean and std, num_classes 0). `timm/model.safetensors` is a copy of `encoder.safetensors`: the backbone is a
timm model without its classifier, so its weights already have timm's key names.

timm's own data config (`timm.data.resolve_model_data_config`) then normalises as `load_encoder` does, so
uint8 images scaled to [0, 1] and normalised with it give the same features. A backbone with the
small-input stem (model.small_input) is no architecture timm can build from arguments: it gets no timm
folder, and the model card says why.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import timm
import torch

from lejepa.store.layout import CARD, TIMM_CONFIG, TIMM_WEIGHTS
from lejepa.store.storage import Storage
from lejepa.train.export import FrozenEncoder

HF_TOKEN_ENV = "HF_TOKEN"
"""Where the token of a publish.hf_repo upload comes from; never from the config, a file or a command line."""


def timm_config(encoder: FrozenEncoder) -> dict[str, Any]:
    """The `timm/config.json` of an exported encoder, once timm has built a model from it that takes the
    encoder's weights and gives its features; a ValueError says why the encoder is no timm model."""
    description = encoder.description
    if description["small_input"]:
        raise ValueError(
            "its small-input stem (model.small_input: a 3x3 stride-1 first conv) is not a timm architecture "
            "option; load it with lejepa.load_encoder"
        )
    backbone = encoder.backbone
    model_args = dict(backbone.timm_model_args)
    default = backbone.pretrained_cfg  # the architecture's defaults: which layers are the stem and the head
    channels, size = description["in_chans"], description["img_size"]

    def per_channel(values: list[float]) -> list[float]:
        return list(values) * channels if len(values) == 1 else list(values)

    pretrained_cfg = {
        "input_size": [channels, size, size],
        "fixed_input_size": bool(default.get("fixed_input_size")) and not model_args.get("dynamic_img_size"),
        # As lejepa's eval_view: the whole image resized to size x size (bilinear), no crop.
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": per_channel(description["mean"]),
        "std": per_channel(description["std"]),
        "num_classes": 0,
        "first_conv": default.get("first_conv"),
        "classifier": default.get("classifier"),
    }
    config = {
        "architecture": description["backbone"],
        "num_classes": 0,
        "num_features": description["embed_dim"],
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }
    _check_timm_builds(config, encoder)
    return config


@torch.no_grad()
def _check_timm_builds(config: dict[str, Any], encoder: FrozenEncoder) -> None:
    """Refuse a config whose timm model does not take the encoder's weights or gives other features."""
    name = config["architecture"]
    model = timm.create_model(name, pretrained=False, num_classes=0, **config["model_args"]).eval()
    state = encoder.backbone.state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"timm's {name} does not take its weights: {str(exc).splitlines()[0]}") from None
    channels, size = config["pretrained_cfg"]["input_size"][0], config["pretrained_cfg"]["input_size"][1]
    images = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(config["pretrained_cfg"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["pretrained_cfg"]["std"]).view(1, -1, 1, 1)
    ours = encoder(images.to(encoder.mean.device)).cpu()
    theirs = model((images - mean) / std)
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        raise ValueError(f"timm's {name} built from the same arguments gives other features than the encoder")


def upload_release(storage: Storage, model_uri: str, repo: str, token: str, message: str) -> str:
    """Upload the release's timm folder and its model card (as the repo's README.md) to the hub model repo
    `repo`, created private when missing; returns the repo's URL. The token goes to huggingface_hub only."""
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        for name in (TIMM_CONFIG, TIMM_WEIGHTS, CARD):
            storage.get_file(f"{model_uri}/{name}", Path(tmp) / Path(name).name)
        api = HfApi(token=token)
        api.create_repo(repo, repo_type="model", private=True, exist_ok=True)
        api.upload_folder(repo_id=repo, repo_type="model", folder_path=tmp, commit_message=message)
    return f"https://huggingface.co/{repo}"
