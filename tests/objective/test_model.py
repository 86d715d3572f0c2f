"""Encoder: timm backbones behind one constructor, views of two sizes, small-input stems, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lejepa.config import ModelConfig
from lejepa.objective.model import Encoder, create_backbone, keep_norm_statistics_fp32

# Small projector so the tests measure the plumbing, not a 2048-wide MLP.
PROJ = {"proj_dim": 16, "proj_hidden_dim": 32}

# (backbone, channels, global size, local size, Encoder kwargs, embedding width); the ViT is cut to
# two blocks because the tests check the plumbing, and a full-depth ViT is slow on a CPU.
CASES = [
    ("resnet18", 1, 28, 12, {"small_input": True}, 512),
    ("resnet18", 3, 32, 16, {}, 512),
    ("vit_tiny_patch16_224", 3, 32, 16, {"img_size": 32, "patch_size": 4, "depth": 2}, 192),
    ("convnext_atto", 1, 32, 16, {"small_input": True}, 320),
]


def _views(generator: torch.Generator, views: int, batch: int, channels: int, size: int) -> torch.Tensor:
    return torch.randn(views, batch, channels, size, size, generator=generator)


@pytest.mark.parametrize(("backbone", "channels", "global_size", "local_size", "kwargs", "width"), CASES)
def test_forward_views_shapes_and_order(
    backbone: str, channels: int, global_size: int, local_size: int, kwargs: dict, width: int
) -> None:
    torch.manual_seed(0)
    encoder = Encoder(backbone, in_chans=channels, **PROJ, **kwargs)
    g = torch.Generator().manual_seed(0)
    global_views = _views(g, 2, 2, channels, global_size)
    local_views = _views(g, 3, 2, channels, local_size)

    embeddings, projections = encoder.forward_views(global_views, local_views)

    assert encoder.embed_dim == width
    assert embeddings.shape == (5, 2, width)
    assert projections.shape == (5, 2, 16)
    # In eval mode every view is independent of the others: view v, sample i must be what the plain
    # forward gives for that image, which pins down the (views, batch) order of the outputs.
    encoder.eval()
    with torch.no_grad():
        embeddings, projections = encoder.forward_views(global_views, local_views)
        for v, images in enumerate([*global_views, *local_views]):
            single_emb, single_proj = encoder(images)
            torch.testing.assert_close(embeddings[v], single_emb, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(projections[v], single_proj, atol=1e-4, rtol=1e-4)


def test_gradients_reach_backbone_and_projector() -> None:
    torch.manual_seed(0)
    encoder = Encoder("resnet18", in_chans=1, small_input=True, **PROJ)
    g = torch.Generator().manual_seed(1)
    embeddings, projections = encoder.forward_views(_views(g, 2, 2, 1, 16), _views(g, 2, 2, 1, 8))
    (projections.square().mean() + embeddings.square().mean()).backward()

    stem_grad = encoder.backbone.conv1.weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0
    for layer in encoder.projector:
        if isinstance(layer, nn.Linear):
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_small_input_keeps_resolution_in_the_stem() -> None:
    stock = create_backbone("resnet18", in_chans=1)
    small = create_backbone("resnet18", in_chans=1, small_input=True)
    assert stock.conv1.stride == (2, 2) and isinstance(stock.maxpool, nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    images = torch.zeros(2, 1, 28, 28)
    # Total stride 32 -> 8: a 28 px image ends as a 4x4 map instead of 1x1.
    assert stock.forward_features(images).shape[-2:] == (1, 1)
    assert small.forward_features(images).shape[-2:] == (4, 4)

    convnext = create_backbone("convnext_atto", in_chans=3, small_input=True)
    assert convnext.stem[0].stride == (1, 1) and convnext.stem[0].in_channels == 3
    assert convnext.forward_features(torch.zeros(2, 3, 16, 16)).shape[-2:] == (2, 2)


def test_small_input_rejects_a_backbone_it_cannot_adapt() -> None:
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, small_input=True)


def test_img_size_reaches_vits_and_is_ignored_by_convnets() -> None:
    vit = create_backbone("vit_tiny_patch16_224", in_chans=1, img_size=32, patch_size=4, depth=1)
    assert vit.patch_embed.img_size == (32, 32)
    assert vit.pos_embed.shape[1] == 1 + (32 // 4) ** 2
    assert vit(torch.zeros(1, 1, 16, 16)).shape == (1, 192)  # local views resample the position embeddings
    assert create_backbone("resnet18", in_chans=1, img_size=32).num_features == 512
    # Only the size arguments are dropped for models that do not take them; a typo still fails.
    with pytest.raises(TypeError, match="not_an_option"):
        create_backbone("resnet18", in_chans=1, img_size=32, not_an_option=1)


def test_from_config() -> None:
    cfg = ModelConfig(
        backbone="vit_tiny_patch16_224",
        proj_dim=8,
        proj_hidden_dim=24,
        proj_layers=2,
        backbone_kwargs={"patch_size": 4, "depth": 2},
    )
    encoder = Encoder.from_config(cfg, in_chans=3, img_size=16)
    assert len(encoder.backbone.blocks) == 2
    assert [type(m) for m in encoder.projector] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]
    assert encoder.projector[0].out_features == 24 and encoder.projector[-1].out_features == 8
    _, projections = encoder(torch.randn(4, 3, 16, 16))
    assert projections.shape == (4, 8)

    small = Encoder.from_config(ModelConfig(small_input=True, proj_layers=1), in_chans=1, img_size=28)
    assert isinstance(small.backbone.maxpool, nn.Identity)
    assert [type(m) for m in small.projector] == [nn.Linear]


def test_bf16_autocast_and_empty_local_group() -> None:
    torch.manual_seed(0)
    encoder = Encoder("resnet18", in_chans=1, small_input=True, **PROJ)
    g = torch.Generator().manual_seed(2)
    global_views, no_local_views = _views(g, 2, 2, 1, 16), _views(g, 0, 2, 1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings, projections = encoder.forward_views(global_views, no_local_views)
    assert embeddings.shape == (2, 2, 512) and projections.shape == (2, 2, 16)
    assert torch.isfinite(embeddings.float()).all() and torch.isfinite(projections.float()).all()
    projections.float().square().mean().backward()
    assert encoder.backbone.conv1.weight.grad is not None


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_bf16_parameters_keep_fp32_batch_norm_statistics(device: str) -> None:
    # As DeepSpeed's bf16 mode leaves the model: parameters bf16, buffers as they were.
    torch.manual_seed(0)
    reference = Encoder("resnet18", in_chans=1, small_input=True, **PROJ).to(device)
    model = Encoder("resnet18", in_chans=1, small_input=True, **PROJ).to(device)
    model.load_state_dict(reference.state_dict())
    keys = list(model.state_dict())
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    keep_norm_statistics_fp32(model)

    views = torch.randn(2, 8, 1, 16, 16, device=device)
    _, projections = model.forward_views(views.to(torch.bfloat16), views[:0, :, :, :8, :8].to(torch.bfloat16))
    projections.float().square().mean().backward()
    reference.forward_views(views, views[:0, :, :, :8, :8])

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    references = [m for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == len(references) > 10 and list(model.state_dict()) == keys
    for norm, ref in zip(norms, references, strict=True):
        assert norm.running_mean.dtype == norm.running_var.dtype == torch.float32
        assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.bfloat16
        assert int(norm.num_batches_tracked) == int(ref.num_batches_tracked) > 0
        torch.testing.assert_close(norm.running_mean, ref.running_mean, atol=0.02, rtol=0.05)
        torch.testing.assert_close(norm.running_var, ref.running_var, atol=0.02, rtol=0.05)
