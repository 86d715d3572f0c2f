"""Multi-crop views for LeJEPA, computed on whole batches of tensors (CPU or GPU), not image by image.

The recipe is the paper's (after BYOL/DINO): G global views at crop scale 0.3-1 and L local views at
0.05-0.3, each with a random resized crop (aspect ratio 3/4-4/3) and horizontal flip, colour jitter,
random grayscale, Gaussian blur and solarization. Every random choice is drawn per sample and view from
one `torch.Generator`, so a seeded call is reproducible. Differences from the torchvision pipeline, made
for speed: crops are resampled bilinearly without antialiasing, the jitter's four adjustments run in a
fixed order, and crops that would not fit (large scale with an extreme aspect ratio) are clamped to the
image instead of re-drawn.
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


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # ITU-R 601, as torchvision


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return torch.lerp(other, x, factor).clamp_(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images (n, 3, H, W) by `shift` (n,) turns, through HSV."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    chroma = value - x.amin(1)
    saturation = chroma / value.clamp(min=1e-8)
    c = chroma.clamp(min=1e-8)  # grey pixels have no hue; their saturation of 0 makes it irrelevant
    hue = torch.where(value == r, (g - b) / c, torch.where(value == g, (b - r) / c + 2, (r - g) / c + 4))
    hue = (hue / 6 + shift.view(-1, 1, 1)) % 1
    # HSV -> RGB in closed form: channel k(n) = (n + 6 * hue) mod 6 for n = 5, 3, 1 (R, G, B).
    # The offsets 5, 3, 1 made on the device: copying a constant from host memory would wait for the GPU.
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (offsets + 6 * hue.unsqueeze(1)) % 6
    return value.unsqueeze(1) - (value * saturation).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def _color_jitter(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    n, device = x.shape[0], x.device
    applied = _bernoulli(n, JITTER_P, generator, device)

    def factor(strength: float) -> torch.Tensor:
        # Samples left alone get the identity factor, so one pass serves the whole batch.
        drawn = _uniform(n, 1 - strength, 1 + strength, generator, device)
        return torch.where(applied, drawn, 1.0).view(n, 1, 1, 1)

    x = (x * factor(BRIGHTNESS)).clamp_(0, 1)
    x = _blend(x, _grayscale(x).mean((1, 2, 3), keepdim=True), factor(CONTRAST))
    if x.shape[1] == 3:  # saturation and hue do not exist for grey images
        x = _blend(x, _grayscale(x), factor(SATURATION))
        x = _shift_hue(x, torch.where(applied, _uniform(n, -HUE, HUE, generator, device), 0.0))
    return x


def _random_grayscale(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    chosen = _bernoulli(x.shape[0], GRAYSCALE_P, generator, x.device).view(-1, 1, 1, 1)
    return torch.where(chosen, _grayscale(x).expand_as(x), x)


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
            torch.zeros(self.local_views, device=x.device),
            generator,
        )
        return global_views, local_views

    def _views(
        self,
        x: torch.Tensor,
        views: int,
        size: int,
        scale: tuple[float, float],
        solarize_p: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
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
        crops = _color_jitter(crops, generator)
        crops = _random_grayscale(crops, generator)
        crops = _random_blur(crops, generator)
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
