"""The encoder: any timm backbone plus the LeJEPA projector, behind one constructor.

`Encoder("resnet18", in_chans=1)` and `Encoder("vit_tiny_patch16_224", img_size=32, patch_size=4)` take the
same arguments, as timm's `create_model` does. `forward_views` runs the global and the local views (which
have different sizes) through the backbone one group at a time and through the projector all together.
`create_backbone` builds the backbone alone, which is what an exported encoder is rebuilt from.
"""

from __future__ import annotations

import timm
import torch
from timm.models.convnext import ConvNeXt
from torch import nn

from lejepa.config import ModelConfig, no_weight_arguments


def _adapt_stem_to_small_input(backbone: nn.Module, name: str) -> None:
    """Keep full resolution in the stem, as is standard for CIFAR-sized (28-32 px) images.

    A stock ResNet downsamples 4x before its first block (7x7 stride-2 conv, then a max-pool), so a 28 px
    image ends as a 1x1 map; a ConvNeXt does the same with its 4x4 stride-4 patchify conv. Both stems
    become a 3x3 stride-1 conv (and the ResNet loses its max-pool), which makes the total stride 8.
    """
    conv1 = getattr(backbone, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and isinstance(getattr(backbone, "maxpool", None), nn.MaxPool2d):
        stem = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet init
        backbone.conv1 = stem
        backbone.maxpool = nn.Identity()
    elif isinstance(backbone, ConvNeXt) and isinstance(backbone.stem[0], nn.Conv2d):
        patchify = backbone.stem[0]
        stem = nn.Conv2d(patchify.in_channels, patchify.out_channels, 3, stride=1, padding=1)
        nn.init.trunc_normal_(stem.weight, std=0.02)  # timm's ConvNeXt init
        nn.init.zeros_(stem.bias)
        backbone.stem[0] = stem
    else:
        raise ValueError(
            f"small_input is not supported for backbone '{name}': it adapts ResNet-like (conv1 + maxpool) "
            "and ConvNeXt stems only; for a ViT pass a smaller patch_size in backbone_kwargs instead"
        )


def create_backbone(
    name: str, in_chans: int = 1, img_size: int | None = None, small_input: bool = False, **kwargs: object
) -> nn.Module:
    """A timm model without its classifier: images (B, C, H, W) -> pooled features (B, num_features).

    The encoder's backbone, and what an exported encoder is rebuilt from; arguments as for `Encoder`.
    """
    no_weight_arguments(kwargs)  # also when they come from an encoder.json in the store
    # ViT-like models fix their position embeddings at construction: give them the global view size and
    # let them resample for the smaller local views. ConvNets reject these arguments, so drop them one
    # by one when timm says so, rather than keeping a list of model families here.
    size_kwargs: dict[str, object] = {}
    if img_size is not None:
        size_kwargs = {"img_size": img_size, "dynamic_img_size": True}
    while True:
        try:
            backbone = timm.create_model(
                name, pretrained=False, num_classes=0, in_chans=in_chans, **{**size_kwargs, **kwargs}
            )
            break
        except TypeError as exc:
            rejected = [key for key in size_kwargs if f"'{key}'" in str(exc) and key not in kwargs]
            if not rejected:
                raise
            del size_kwargs[rejected[0]]
    # What timm.create_model accepted: a release's timm/config.json rebuilds the backbone from it.
    backbone.timm_model_args = {"in_chans": in_chans, **size_kwargs, **kwargs}
    if small_input:
        _adapt_stem_to_small_input(backbone, name)
    return backbone


def _projector(embed_dim: int, hidden_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    # As in the LeJEPA reference: (layers - 1) Linear-BN-GELU blocks to hidden_dim, then a plain Linear.
    blocks: list[nn.Module] = []
    dim = embed_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    """A timm backbone (pooled features, no classifier) followed by the projector.

    Args:
        backbone: any timm model name; created with ``pretrained=False``.
        in_chans: image channels (1 for grey, 3 for RGB).
        img_size: side of the global views; passed (with ``dynamic_img_size=True``) to models that take it,
            such as ViTs, and ignored by ConvNets.
        small_input: swap a ResNet or ConvNeXt stem for a 3x3 stride-1 conv (CIFAR-style) so 28-32 px
            images are not reduced to 1x1 maps; a ValueError names a backbone it cannot adapt.
        **backbone_kwargs: passed to ``timm.create_model`` (e.g. ``patch_size=4``, ``drop_path_rate``).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_chans: int = 1,
        img_size: int | None = None,
        proj_dim: int = 128,
        proj_hidden_dim: int = 2048,
        proj_layers: int = 3,
        small_input: bool = False,
        **backbone_kwargs: object,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, in_chans, img_size, small_input, **backbone_kwargs)
        self.embed_dim: int = self.backbone.num_features
        self.proj_dim = proj_dim
        self.projector = _projector(self.embed_dim, proj_hidden_dim, proj_dim, proj_layers)

    @classmethod
    def from_config(cls, cfg: ModelConfig, in_chans: int, img_size: int | None = None) -> Encoder:
        return cls(
            cfg.backbone,
            in_chans=in_chans,
            img_size=img_size,
            proj_dim=cfg.proj_dim,
            proj_hidden_dim=cfg.proj_hidden_dim,
            proj_layers=cfg.proj_layers,
            small_input=cfg.small_input,
            **cfg.backbone_kwargs,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> embeddings (B, embed_dim) and projections (B, proj_dim)."""
        embeddings = self.backbone(x)
        return embeddings, self.projector(embeddings)

    def forward_views(self, *groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Groups of same-sized views (V_g, B, C, H_g, W_g) -> embeddings (V, B, D), projections (V, B, P).

        V is the sum of the V_g, in the order given (e.g. global views first, then local views). The
        backbone runs once per group, since views of different sizes cannot share a batch; the projector
        runs once on all of them so its BatchNorm sees every view.
        """
        embeddings = []
        for views in groups:
            if views.dim() != 5:
                raise ValueError(f"forward_views expects (views, batch, C, H, W), got {tuple(views.shape)}")
            if views.shape[0] > 0:  # e.g. a run with local_views=0
                # NHWC input makes oneDNN and cuDNN run the whole ConvNet in NHWC, their fastest layout
                # (~1.15x a ConvNet step on this CPU). The weights stay NCHW, as DeepSpeed's flat buffers
                # need.
                images = views.flatten(0, 1).contiguous(memory_format=torch.channels_last)
                embeddings.append(self.backbone(images).unflatten(0, views.shape[:2]))
        if not embeddings:
            raise ValueError("forward_views needs at least one non-empty group of views")
        stacked = torch.cat(embeddings)
        projections = self.projector(stacked.flatten(0, 1)).unflatten(0, stacked.shape[:2])
        return stacked, projections


class _Fp32Statistics(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose statistics stay fp32 when its parameters are bf16: it normalises a bf16 input with
    fp32 running mean and variance and its weight and bias upcast, as PyTorch's autocast would. The same
    module otherwise (state-dict keys, momentum, eval mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)
        track = not self.training or self.track_running_stats
        return nn.functional.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            self.training or (self.running_mean is None and self.running_var is None),
            momentum,
            self.eps,
        )


_FP32_STATISTICS: dict[type, type] = {}


def keep_norm_statistics_fp32(module: nn.Module) -> None:
    """Make every BatchNorm in `module` keep fp32 running statistics under bf16 parameters.

    DeepSpeed's bf16 mode casts parameters and leaves buffers alone (older releases cast both); a plain
    BatchNorm then refuses a bf16 weight beside fp32 statistics on the CPU. Each BatchNorm becomes its
    `_Fp32Statistics` subclass in place (no new state), and its buffers fp32.
    """
    for norm in module.modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or isinstance(norm, _Fp32Statistics):
            continue
        cls = type(norm)
        if cls not in _FP32_STATISTICS:
            _FP32_STATISTICS[cls] = type(f"Fp32Statistics{cls.__name__}", (_Fp32Statistics, cls), {})
        norm.__class__ = _FP32_STATISTICS[cls]
        for name in ("running_mean", "running_var"):
            buffer = getattr(norm, name)
            if buffer is not None:
                buffer.data = buffer.data.float()
