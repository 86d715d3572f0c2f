"""Multi-crop views for LeJEPA, computed on whole batches of tensors (CPU or GPU), not image by image.

The recipe is the paper's (after BYOL/DINO): G global views at crop scale 0.3-1 and L local views at
0.05-0.3, each with a random resized crop (aspect ratio 3/4-4/3) and horizontal flip, colour jitter,
random grayscale, Gaussian blur and solarization. Every random choice is drawn per sample and view from
one `torch.Generator`, so a seeded call is reproducible.

The brightness is applied and clamped first; the rest of the colour jitter and the random grayscale
compose into one affine colour map per crop, applied in one pass after the blur (both are linear, so the
order does not matter before the clamp): on a GPU a view costs a few passes over its pixels instead of
dozens. Differences from the torchvision pipeline, made for speed:
- crops are resampled bilinearly without antialiasing;
- the jitter's four adjustments run in a fixed order, with a clamp to [0, 1] after the brightness and
  one at the end instead of one after each;
- the hue shift rotates the chroma plane of YIQ, keeping the luma, instead of shifting HSV's hue: for
  saturated colours the HSV hue moves the same way, within 0.045 turns of the drawn shift of up to 0.1;
- crops that would not fit (large scale with an extreme aspect ratio) are clamped to the image instead of
  re-drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lejepa.config import ViewsConfig

FLIP_P = 0.5
JITTER_P = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_P = 0.2
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
"""In pixels of a 224 px view; scaled by view_size / 224 so the blur is the same relative to the view."""
SOLARIZE_P = 0.2
"""Applied to every global view but the first (BYOL's asymmetric recipe); never to local views."""
SOLARIZE_THRESHOLD = 0.5
LOCAL_TO_GLOBAL = 96 / 224
"""The paper's local/global view sizes; used when the config leaves local_size unset."""


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _bernoulli(
    n: int, p: float | torch.Tensor, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0-255 or float images in [0, 1] -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()


def random_crop_affines(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Affine matrices (n, 2, 3) for `F.affine_grid` that each select a random resized crop, maybe flipped.

    As torchvision's RandomResizedCrop: the crop covers a fraction `scale` of the image area, with an
    aspect ratio log-uniform in 3/4-4/3 (in pixels), placed uniformly inside the image.
    """
    device = torch.device(device)
    area = _uniform(n, *scale, generator, device)
    ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), generator, device).exp()
    # Crop sides as fractions of the image sides; clamped so every crop lies inside the image.
    crop_w = (area * ratio * height / width).sqrt().clamp(max=1.0)
    crop_h = (area / ratio * width / height).sqrt().clamp(max=1.0)
    left = (1 - crop_w) * torch.rand(n, generator=generator, device=device)
    top = (1 - crop_h) * torch.rand(n, generator=generator, device=device)
    flip = torch.where(_bernoulli(n, FLIP_P, generator, device), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    # affine_grid maps output coordinates in [-1, 1] to input ones: scale to the crop, shift to its centre.
    theta[:, 0, 0] = crop_w * flip
    theta[:, 0, 2] = 2 * left + crop_w - 1
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = 2 * top + crop_h - 1
    return theta


GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601 luma, as torchvision's grayscale."""
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
"""Hue is rotated in YIQ's chroma plane (I, Q), which keeps the luma Y."""


def _random_colour(
    crops: torch.Tensor, gray: torch.Tensor, yiq: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colour jitter and random grayscale of n crops (n, C, H, W): the brightened crops, clamped, and the
    rest as one affine map per crop, (n, C, C) and (n, C), to apply after them.

    Brightness scales the pixel values and is clamped at once, as torchvision does: it is the adjustment
    that pushes most of them past 1, and a clamp only at the end would leave the contrast to pull those
    back from beyond white. The other adjustments are affine in the pixel values: contrast blends them
    with the mean grey of the brightened crop, saturation blends them with their own grey, the hue shift
    rotates the chroma plane of YIQ (`yiq`: RGB -> YIQ and its inverse), and grayscale replaces them with
    their grey (`gray`: the luma weights, (1, C)). So they compose into one matrix and offset, applied in
    one pass, with one clamp at the end.
    """
    n, c = crops.shape[:2]
    device = crops.device
    applied = _bernoulli(n, JITTER_P, generator, device)

    def factor(strength: float) -> torch.Tensor:
        # Crops left alone get the identity factor, so one pass serves the whole batch.
        drawn = _uniform(n, 1 - strength, 1 + strength, generator, device)
        return torch.where(applied, drawn, 1.0).view(n, 1, 1)

    crops = (crops * factor(BRIGHTNESS).unsqueeze(3)).clamp_(0, 1)
    eye = torch.eye(c, device=device)
    to_gray = gray.expand(c, c)  # every channel becomes the grey
    contrast = factor(CONTRAST)
    mean_gray = gray @ crops.mean((2, 3)).unsqueeze(2)  # (n, 1, 1): the grey of the mean pixel
    matrix, offset = contrast * eye, (1 - contrast) * mean_gray.expand(n, c, 1)
    if c == 3:  # saturation, hue and grayscale do not exist for grey images
        saturation = factor(SATURATION)
        stages = [saturation * eye + (1 - saturation) * to_gray, _hue_rotation(applied, yiq, generator)]
        grayscale = _bernoulli(n, GRAYSCALE_P, generator, device).view(n, 1, 1)
        stages.append(torch.where(grayscale, to_gray, eye))
        for stage in stages:
            matrix, offset = stage @ matrix, stage @ offset
    return crops, matrix, offset.squeeze(2)


def _hue_rotation(
    applied: torch.Tensor, yiq: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """(n, 3, 3) RGB maps that shift the hue of the `applied` crops by up to HUE turns either way.

    `yiq` (RGB -> YIQ and its inverse) is a buffer of the views module, made once: building a constant
    from host memory here would wait for the GPU.
    """
    n = applied.shape[0]
    turns = torch.where(applied, _uniform(n, -HUE, HUE, generator, applied.device), 0.0)
    # Rotating I towards Q moves red towards yellow and green, as HSV's positive hue shift does.
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([one, zero, zero, zero, cos, sin, zero, -sin, cos], 1).view(n, 3, 3)
    return yiq[1] @ rotation @ yiq[0]  # RGB -> YIQ, rotate, back to RGB


def _random_blur(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    n, c, h, w = x.shape
    sigma_low, sigma_high = (s * h / 224 for s in BLUR_SIGMA)
    sigma = _uniform(n, sigma_low, sigma_high, generator, x.device).view(n, 1)
    radius = max(1, math.ceil(3 * sigma_high))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    # Samples that are not blurred get a delta kernel: one grouped conv for the batch, no gather/scatter.
    blurred = _bernoulli(n, BLUR_P, generator, x.device).view(n, 1)
    kernel = torch.where(blurred, kernel, (taps == 0).to(x.dtype))
    kernel = kernel.repeat_interleave(c, 0)  # one separable kernel per (sample, channel)
    x = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def _random_solarize(x: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    chosen = _bernoulli(x.shape[0], p, generator, x.device).view(-1, 1, 1, 1)
    return torch.where(chosen & (x >= SOLARIZE_THRESHOLD), 1 - x, x)


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _channel_stats(value: Sequence[float] | None, channels: int, name: str) -> torch.Tensor:
    stats = torch.full((channels,), 0.5) if value is None else torch.as_tensor(value, dtype=torch.float32)
    if stats.shape != (channels,):
        raise ValueError(f"{name} needs one value per channel ({channels}), got {list(stats.shape)}")
    return stats


class MultiCropViews(nn.Module):
    """Batched multi-crop augmentation: images (B, C, H, W) -> global and local views, normalised.

    `forward` returns global views (G, B, C, global_size, global_size) and local views
    (L, B, C, local_size, local_size), float32, normalised with `mean`/`std` (0.5 per channel unless
    given, e.g. from dataset statistics). It runs on the device of the images.
    """

    def __init__(
        self,
        channels: int,
        global_views: int = 2,
        local_views: int = 6,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.3, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.3),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"MultiCropViews supports 1 (grey) or 3 (RGB) channels, got {channels}")
        self.channels = channels
        self.global_views, self.local_views = global_views, local_views
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = global_scale, local_scale
        # Buffers follow the module to the GPU; non-persistent, as they are settings, not learned state.
        self.register_buffer("mean", _channel_stats(mean, channels, "mean"), persistent=False)
        self.register_buffer("std", _channel_stats(std, channels, "std"), persistent=False)
        gray = torch.tensor([GRAY_WEIGHTS if channels == 3 else (1.0,)])
        self.register_buffer("gray", gray, persistent=False)
        yiq = torch.tensor(RGB_TO_YIQ)
        self.register_buffer("yiq", torch.stack([yiq, torch.linalg.inv(yiq)]), persistent=False)

    @classmethod
    def from_config(
        cls,
        cfg: ViewsConfig,
        resolution: int,
        channels: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> MultiCropViews:
        """Views for a dataset of `resolution` px images; sizes left unset in `cfg` are derived from it.

        Global views keep the dataset's resolution; local views are 96/224 of the global size (the paper's
        224/96), rounded to an even number of pixels: 28 -> 28/12, 32 -> 32/14, 224 -> 224/96.
        """
        global_size = cfg.global_size or resolution
        local_size = cfg.local_size or max(2, 2 * round(global_size * LOCAL_TO_GLOBAL / 2))
        return cls(
            channels,
            global_views=cfg.global_views,
            local_views=cfg.local_views,
            global_size=global_size,
            local_size=local_size,
            global_scale=cfg.global_scale,
            local_scale=cfg.local_scale,
            mean=mean,
            std=std,
        )

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images (B, {self.channels}, H, W), got {tuple(images.shape)}")
        x = _to_float(images)
        # Per-view settings are made where the images are, so no host-to-device copy stalls a GPU.
        # (Writing a Python number into a GPU tensor is such a copy: the first view's 0 comes from `where`.)
        first = torch.arange(self.global_views, device=x.device) == 0
        global_solarize_p = torch.where(first, 0.0, SOLARIZE_P)
        global_views = self._views(
            x, self.global_views, self.global_size, self.global_scale, global_solarize_p, generator
        )
        local_views = self._views(
            x,
            self.local_views,
            self.local_size,
            self.local_scale,
            None,
            generator,
        )
        return global_views, local_views

    def _views(
        self,
        x: torch.Tensor,
        views: int,
        size: int,
        scale: tuple[float, float],
        solarize_p: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """`views` views of each image in `x`, solarized with probability `solarize_p` (per view; None:
        never)."""
        b, c, h, w = x.shape
        if views == 0:
            return x.new_empty(0, b, c, size, size)
        n = views * b  # view-major: sample i of view v is row v * b + i
        theta = random_crop_affines(n, h, w, scale, generator, x.device)
        grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
        # Stack each image's views along the output height, so grid_sample reads every image once
        # instead of needing a copy of the batch per view.
        grid = grid.view(views, b, size, size, 2).transpose(0, 1).reshape(b, views * size, size, 2)
        crops = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        crops = crops.view(b, c, views, size, size).permute(2, 0, 1, 3, 4).reshape(n, c, size, size)
        # The contrast's mean grey is that of the brightened crop, before the blur.
        crops, matrix, offset = _random_colour(crops, self.gray, self.yiq, generator)
        # The blur and the colour map are both linear (the blur's kernel sums to 1), so blurring first and
        # mapping the colours after gives what the reverse order gives, up to the clamp.
        crops = _random_blur(crops, generator)
        crops = torch.baddbmm(offset.unsqueeze(2), matrix, crops.view(n, c, -1)).clamp_(0, 1)
        crops = crops.view(n, c, size, size)
        if solarize_p is not None:
            crops = _random_solarize(crops, solarize_p.repeat_interleave(b), generator)
        return _normalize(crops, self.mean, self.std).view(views, b, c, size, size)


def eval_view(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """The deterministic view for evaluation and exported encoders: resize to `size` and normalise.

    Images are uint8 (B, C, H, W) or float in [0, 1]; mean/std default to 0.5 per channel, as in
    MultiCropViews, and must match the ones used in training.
    """
    x = _to_float(images)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    channels = x.shape[1]
    mean_t = _channel_stats(mean, channels, "mean").to(x.device)
    std_t = _channel_stats(std, channels, "std").to(x.device)
    return _normalize(x, mean_t, std_t)
