"""The UNet used for 2D (1 slice), 2.5D (5 slices as channels) and 3D segmentation, plus size helpers.

`UNet` is the classic encoder-decoder: per level two 3x3(x3) convolutions, each followed by a norm and
LeakyReLU; max-pooling down; transposed convolutions up; skip connections concatenated; a 1x1 convolution
to one logit per class (no activation: the losses and metrics apply the sigmoid). `unet_for_run` builds the
UNet a run config describes (every caller builds a run's model through it); `count_parameters` sizes it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import config_shenron as C
from config_shenron import NORMS

LEAKY_SLOPE = 0.01
MAX_GROUPS = 8


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels)


class ConvBlock(nn.Sequential):
    """Two (conv 3x3(x3) -> norm -> LeakyReLU) layers."""

    def __init__(self, in_channels: int, out_channels: int, dims: int, norm: str):
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        layers = []
        for channels_in in (in_channels, out_channels):
            # No conv bias: the norm's affine shift makes it redundant.
            layers += [conv(channels_in, out_channels, kernel_size=3, padding=1, bias=False),
                       _norm(norm, dims, out_channels), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """UNet with `depth` resolution levels (depth - 1 poolings); channels double at every level.

    Input [B, in_channels, *spatial] with every spatial size divisible by 2 ** (depth - 1); output
    [B, num_classes, *spatial] logits. `dropout` is channel dropout after the bottleneck block.
    """

    def __init__(self, in_channels: int, num_classes: int, dims: int = 2, base_channels: int = 32, depth: int = 4,
                 norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims {dims} is not supported: choose 2 or 3")
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r} is not supported: choose one of {', '.join(NORMS)}")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("base_channels", base_channels), ("depth", depth)):
            if value < 1:
                raise ValueError(f"{name} {value} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout {dropout} must be in [0, 1)")
        self.in_channels, self.num_classes, self.dims, self.depth = in_channels, num_classes, dims, depth

        widths = [base_channels * 2 ** level for level in range(depth)]
        conv_transpose = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.encoder = nn.ModuleList(
            ConvBlock(c_in, c_out, dims, norm) for c_in, c_out in zip([in_channels] + widths[:-1], widths))
        self.pool = (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(2)
        dropout_layer = nn.Dropout2d if dims == 2 else nn.Dropout3d
        self.bottleneck_dropout = dropout_layer(dropout) if dropout > 0 else nn.Identity()
        self.upsample = nn.ModuleList(
            conv_transpose(widths[level + 1], widths[level], kernel_size=2, stride=2) for level in range(depth - 1))
        self.decoder = nn.ModuleList(
            ConvBlock(2 * widths[level], widths[level], dims, norm) for level in range(depth - 1))
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(widths[0], num_classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def check_input_shape(self, shape) -> None:
        shape = tuple(shape)
        if len(shape) != self.dims + 2 or shape[1] != self.in_channels:
            raise ValueError(f"input shape {shape} must be [B, {self.in_channels}, "
                             f"{', '.join('DHW'[3 - self.dims:])}] for this {self.dims}D UNet")
        if any(size % self.size_multiple for size in shape[2:]):
            raise ValueError(f"input shape {shape}: spatial sizes {shape[2:]} must be multiples of "
                             f"{self.size_multiple} (2 ** (depth - 1), depth {self.depth})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_shape(x.shape)
        skips = []
        for level, block in enumerate(self.encoder):
            if level:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = self.bottleneck_dropout(skips.pop())
        for up, block in zip(reversed(self.upsample), reversed(self.decoder)):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unet_for_run(cfg: C.RunConfig) -> UNet:
    """The UNet a run config describes (model config's input channels and dims, the run's classes, width,
    depth and norm): training, evaluation and the tests build a run's model only through this."""
    model_cfg = C.MODELS[cfg.model]
    return UNet(model_cfg.in_channels, len(cfg.classes), dims=model_cfg.dims, base_channels=cfg.base_channels,
                depth=cfg.depth, norm=cfg.norm)
