"""Multi-crop views: shapes, seeded determinism, crop geometry, statistics, the colour map, evaluation view,
throughput."""

from __future__ import annotations

import colorsys
import math
import time

import pytest
import torch
import torch.nn.functional as F

from lejepa.config import ViewsConfig
from lejepa.objective import views as views_module
from lejepa.objective.views import MultiCropViews, eval_view, random_crop_affines


def _smooth_images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure at several scales, unlike white noise (which blurs to grey)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, 6, 6, generator=g)
    fine = torch.rand(batch, channels, size, size, generator=g)
    images = 0.8 * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + 0.2 * fine
    return (images * 255).round().to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtype_and_seeded_determinism(channels: int) -> None:
    views = MultiCropViews(channels, global_views=2, local_views=6, global_size=28, local_size=12)
    images = _smooth_images(8, channels, 28)

    global_views, local_views = views(images, torch.Generator().manual_seed(0))
    again = views(images, torch.Generator().manual_seed(0))
    other = views(images, torch.Generator().manual_seed(1))

    assert global_views.shape == (2, 8, channels, 28, 28) and global_views.dtype == torch.float32
    assert local_views.shape == (6, 8, channels, 12, 12) and local_views.dtype == torch.float32
    assert torch.equal(global_views, again[0]) and torch.equal(local_views, again[1])
    assert not torch.allclose(global_views, other[0]) and not torch.allclose(local_views, other[1])
    # Views of one image differ from each other (different crops), not just across seeds.
    assert not torch.allclose(global_views[0], global_views[1])
    # Values come from [0, 1] normalised with mean = std = 0.5.
    assert global_views.min() >= -1 - 1e-5 and global_views.max() <= 1 + 1e-5


def test_float_input_matches_uint8_input() -> None:
    views = MultiCropViews(3, global_size=16, local_size=8)
    images = _smooth_images(4, 3, 16)
    from_uint8 = views(images, torch.Generator().manual_seed(3))
    from_float = views(images.float() / 255, torch.Generator().manual_seed(3))
    torch.testing.assert_close(from_uint8, from_float)


@pytest.mark.parametrize("channels", [1, 3])
def test_normalised_with_dataset_statistics(channels: int) -> None:
    images = _smooth_images(256, channels, 28)
    pixels = images.float().div(255).transpose(0, 1).flatten(1)
    mean, std = pixels.mean(1).tolist(), pixels.std(1).tolist()
    views = MultiCropViews(channels, global_size=28, local_size=12, mean=mean, std=std)

    for group in views(images, torch.Generator().manual_seed(0)):
        per_channel = group.transpose(0, 2).flatten(1)
        # Jitter, crops and solarization move the statistics a little, not far: roughly standardised.
        assert per_channel.mean(1).abs().max() < 0.3
        assert ((per_channel.std(1) > 0.7) & (per_channel.std(1) < 1.4)).all()


def test_each_view_comes_from_its_own_image(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the photometric augmentations off, a view of a constant image is that constant: any mix-up
    # between the view and batch dimensions shows as a wrong value.
    for name in ("JITTER_P", "GRAYSCALE_P", "BLUR_P", "SOLARIZE_P"):
        monkeypatch.setattr(views_module, name, 0.0)
    levels = torch.arange(10, 250, 30, dtype=torch.uint8)  # 8 distinct images
    images = levels.view(-1, 1, 1, 1).expand(-1, 3, 20, 20).contiguous()
    views = MultiCropViews(3, global_views=3, local_views=5, global_size=20, local_size=8)

    for group in views(images, torch.Generator().manual_seed(0)):
        expected = (levels.float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(group, expected.view(1, -1, 1, 1, 1).expand_as(group))


def test_crops_stay_inside_the_image_with_the_requested_area() -> None:
    g = torch.Generator().manual_seed(0)
    for height, width, scale in [(28, 28, (0.05, 0.3)), (28, 28, (0.3, 1.0)), (20, 40, (0.3, 1.0))]:
        theta = random_crop_affines(4000, height, width, scale, g)
        half_w, half_h = theta[:, 0, 0].abs(), theta[:, 1, 1]
        # Output coordinates span [-1, 1], so the crop spans centre +- half size in input coordinates.
        assert (theta[:, 0, 2].abs() + half_w <= 1 + 1e-6).all()
        assert (theta[:, 1, 2].abs() + half_h <= 1 + 1e-6).all()
        # Clamping to the image only ever shrinks a crop.
        assert (half_w * half_h <= scale[1] + 1e-6).all()
        flipped = (theta[:, 0, 0] < 0).float().mean()
        assert 0.45 < flipped < 0.55
        assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()
    # Small crops are never clamped, so they keep RandomResizedCrop's area and aspect ranges exactly.
    theta = random_crop_affines(4000, 28, 28, (0.05, 0.3), g)
    area, aspect = theta[:, 0, 0].abs() * theta[:, 1, 1], theta[:, 0, 0].abs() / theta[:, 1, 1]
    assert area.min() >= 0.05 - 1e-6 and area.max() <= 0.3 + 1e-6
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5


def _fixed_draws(monkeypatch: pytest.MonkeyPatch, fraction: float = 0.5) -> None:
    """Every uniform draw at `fraction` of its range; every Bernoulli draw as if its random number were 0.5
    (so the jitter, p = 0.8, applies and grayscale, p = 0.2, does not)."""

    def uniform(n: int, low: float, high: float, generator: object, device: torch.device) -> torch.Tensor:
        return torch.full((n,), low + fraction * (high - low), device=device)

    def bernoulli(n: int, p: float, generator: object, device: torch.device) -> torch.Tensor:
        return torch.full((n,), 0.5, device=device) < p

    monkeypatch.setattr(views_module, "_uniform", uniform)
    monkeypatch.setattr(views_module, "_bernoulli", bernoulli)


def _colour_mapped(crops: torch.Tensor, views: MultiCropViews) -> torch.Tensor:
    n, c = crops.shape[:2]
    brightened, matrix, offset = views_module._random_colour(crops, views.gray, views.yiq, None)
    return (torch.einsum("nck,nkhw->nchw", matrix, brightened) + offset.view(n, c, 1, 1)).clamp(0, 1)


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_one_colour_map_is_the_jitter_applied_one_adjustment_at_a_time(
    monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    _fixed_draws(monkeypatch, fraction)
    crops = torch.rand(4, 3, 10, 10, generator=torch.Generator().manual_seed(0))

    def factor(strength: float) -> float:
        return 1 - strength + 2 * strength * fraction

    def gray(x: torch.Tensor) -> torch.Tensor:
        return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

    x = (crops * factor(views_module.BRIGHTNESS)).clamp(0, 1)  # at 0.9, 1.32: some values clamp
    x = factor(views_module.CONTRAST) * x + (1 - factor(views_module.CONTRAST)) * gray(x).mean((2, 3), True)
    x = factor(views_module.SATURATION) * x + (1 - factor(views_module.SATURATION)) * gray(x)
    to_yiq = torch.tensor(views_module.RGB_TO_YIQ)
    y, i, q = torch.einsum("ck,nkhw->nchw", to_yiq, x).unbind(1)
    angle = 2 * math.pi * views_module.HUE * (2 * fraction - 1)
    i, q = math.cos(angle) * i + math.sin(angle) * q, -math.sin(angle) * i + math.cos(angle) * q
    x = torch.einsum("ck,nkhw->nchw", torch.linalg.inv(to_yiq), torch.stack([y, i, q], 1))

    torch.testing.assert_close(_colour_mapped(crops, MultiCropViews(3)), x.clamp(0, 1))
    # Grey images get brightness and contrast only.
    grey = crops[:, :1]
    x = (grey * factor(views_module.BRIGHTNESS)).clamp(0, 1)
    x = factor(views_module.CONTRAST) * x + (1 - factor(views_module.CONTRAST)) * x.mean((2, 3), True)
    torch.testing.assert_close(_colour_mapped(grey, MultiCropViews(1)), x.clamp(0, 1))


def test_grayscale_gives_every_channel_the_luma(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JITTER_P", "GRAYSCALE_P"):
        monkeypatch.setattr(views_module, name, 1.0 if name == "GRAYSCALE_P" else 0.0)
    crops = torch.rand(4, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    luma = 0.299 * crops[:, 0] + 0.587 * crops[:, 1] + 0.114 * crops[:, 2]
    torch.testing.assert_close(_colour_mapped(crops, MultiCropViews(3)), luma.unsqueeze(1).expand_as(crops))


def test_the_blur_commutes_with_the_colour_map() -> None:
    # What lets the views blur first and map the colours after, in one pass, before the clamp.
    crops = torch.rand(16, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    _, matrix, offset = views_module._random_colour(
        crops, MultiCropViews(3).gray, MultiCropViews(3).yiq, torch.Generator().manual_seed(1)
    )

    def mapped(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nck,nkhw->nchw", matrix, x) + offset.view(16, 3, 1, 1)

    def blurred(x: torch.Tensor) -> torch.Tensor:
        return views_module._random_blur(x, torch.Generator().manual_seed(2))

    assert not torch.allclose(blurred(crops), crops)  # some crops really are blurred
    torch.testing.assert_close(blurred(mapped(crops)), mapped(blurred(crops)))


def test_the_hue_shift_moves_hsv_hue_by_about_the_drawn_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed_draws(monkeypatch, fraction=1.0)  # the largest shift, +HUE turns
    applied = torch.ones(1, dtype=torch.bool)
    rotation = views_module._hue_rotation(applied, MultiCropViews(3).yiq, None)[0]
    colours = torch.rand(3000, 3, generator=torch.Generator().manual_seed(0))
    shifted = colours @ rotation.T
    errors = []
    for before, after in zip(colours.tolist(), shifted.tolist(), strict=True):
        hue, saturation, _ = colorsys.rgb_to_hsv(*before)
        if saturation > 0.2 and all(0 <= v <= 1 for v in after):  # hue is defined and nothing clamped
            moved = colorsys.rgb_to_hsv(*after)[0] - hue
            errors.append((moved - views_module.HUE + 0.5) % 1 - 0.5)
    assert len(errors) > 1000
    assert max(abs(e) for e in errors) < 0.045
    # The hue moves by +HUE on average: no turn the other way, no systematic bias.
    assert abs(sum(errors) / len(errors)) < 0.02


def test_from_config_scales_sizes_to_the_resolution() -> None:
    cfg = ViewsConfig()
    for resolution, global_size, local_size in [(28, 28, 12), (32, 32, 14), (224, 224, 96), (96, 96, 42)]:
        views = MultiCropViews.from_config(cfg, resolution, channels=1)
        assert (views.global_size, views.local_size) == (global_size, local_size)
    views = MultiCropViews.from_config(
        ViewsConfig(global_views=1, local_views=0, global_size=32, local_scale=(0.1, 0.2)),
        28,
        channels=3,
        mean=[0.1, 0.2, 0.3],
        std=[1.0, 2.0, 3.0],
    )
    assert (views.global_views, views.local_views, views.global_size, views.local_size) == (1, 0, 32, 14)
    assert views.local_scale == (0.1, 0.2) and views.std.tolist() == [1.0, 2.0, 3.0]
    global_views, local_views = views(_smooth_images(4, 3, 28))
    assert global_views.shape == (1, 4, 3, 32, 32) and local_views.shape == (0, 4, 3, 14, 14)


def test_rejects_images_with_the_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        MultiCropViews(3, global_size=16, local_size=8)(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mean needs one value per channel"):
        MultiCropViews(3, mean=[0.5])


def test_eval_view_resizes_and_normalises() -> None:
    images = _smooth_images(4, 1, 28)
    view = eval_view(images, 28, mean=[0.25], std=[0.5])
    torch.testing.assert_close(view, (images.float() / 255 - 0.25) / 0.5)
    resized = eval_view(images, 32)
    assert resized.shape == (4, 1, 32, 32) and torch.equal(resized, eval_view(images, 32))
    white = eval_view(torch.full((1, 3, 28, 28), 255, dtype=torch.uint8), 14)
    torch.testing.assert_close(white, torch.ones(1, 3, 14, 14))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_gpu_with_a_device_generator() -> None:
    views = MultiCropViews(3, global_size=32, local_size=16).cuda()
    images = _smooth_images(16, 3, 32).cuda()
    first = views(images, torch.Generator("cuda").manual_seed(0))
    second = views(images, torch.Generator("cuda").manual_seed(0))
    assert first[0].is_cuda and first[1].shape == (6, 16, 3, 16, 16)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_throughput_report() -> None:
    """Prints images/s for the default CPU recipe (run with -s to see it); asserts nothing about speed."""
    views = MultiCropViews.from_config(ViewsConfig(), 28, channels=1)
    images = _smooth_images(256, 1, 28)
    g = torch.Generator().manual_seed(0)
    views(images, g)
    repeats = 5
    start = time.perf_counter()
    for _ in range(repeats):
        global_views, local_views = views(images, g)
    seconds = (time.perf_counter() - start) / repeats
    assert math.isfinite(global_views.sum().item() + local_views.sum().item())
    print(f"\nMultiCropViews 28 px, 2 global + 6 local, B=256: {256 / seconds:.0f} images/s")
