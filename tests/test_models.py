"""models.py: UNet shapes and errors for 2D, 2.5D and 3D, gradients, channels_last, and the size helpers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models import UNet, count_parameters


@pytest.mark.parametrize("in_channels, dims, spatial, depth, base, norm", [
    (1, 2, (32, 32), 4, 8, "batch"),       # 2D
    (5, 2, (32, 16), 3, 4, "instance"),    # 2.5D: five slices as channels
    (1, 3, (8, 16, 16), 3, 4, "group"),    # 3D
    (1, 3, (4, 8, 8), 2, 6, "batch"),
    (3, 2, (7, 9), 1, 4, "group"),         # depth 1: no pooling, any size
])
def test_output_shape_matches_input(in_channels, dims, spatial, depth, base, norm):
    torch.manual_seed(0)
    model = UNet(in_channels, 3, dims=dims, base_channels=base, depth=depth, norm=norm)
    out = model(torch.randn(2, in_channels, *spatial))
    assert out.shape == (2, 3, *spatial)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # Logits, not probabilities: nothing squashes them into [0, 1].
    assert (out < 0).any() and (out > 0).any()


def test_width_and_depth_set_the_levels():
    model = UNet(1, 2, base_channels=6, depth=4)
    assert [block[0].out_channels for block in model.encoder] == [6, 12, 24, 48]
    assert len(model.decoder) == len(model.upsample) == 3
    assert model.head.out_channels == 2 and model.size_multiple == 8
    assert isinstance(model.encoder[0][1], nn.BatchNorm2d)
    assert isinstance(UNet(1, 2, dims=3, base_channels=4, depth=2, norm="instance").encoder[0][1], nn.InstanceNorm3d)


def test_bad_input_size_names_shape_and_multiple():
    model = UNet(1, 2, base_channels=4, depth=4)
    with pytest.raises(ValueError, match=r"\(1, 1, 36, 32\).*multiples of 8"):
        model(torch.zeros(1, 1, 36, 32))
    with pytest.raises(ValueError, match=r"must be \[B, 1, H, W\]"):
        model(torch.zeros(1, 5, 32, 32))
    with pytest.raises(ValueError, match=r"must be \[B, 1, D, H, W\]"):
        UNet(1, 2, dims=3, base_channels=4, depth=2)(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dims=4), "dims 4"), (dict(norm="layer"), "norm 'layer'.*batch, instance, group"),
    (dict(depth=0), "depth 0"), (dict(base_channels=0), "base_channels 0"), (dict(dropout=1.0), "dropout 1.0"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(1, 2, **kwargs)


def test_count_parameters_equals_manual_sum():
    model = UNet(5, 4, base_channels=4, depth=3, norm="group")
    manual = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            manual += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        elif isinstance(module, nn.GroupNorm):
            manual += 2 * module.num_channels
    assert count_parameters(model) == manual
    model.head.weight.requires_grad_(False)
    assert count_parameters(model) == manual - model.head.weight.numel()


def test_gradient_reaches_the_first_convolution():
    torch.manual_seed(0)
    model = UNet(5, 2, base_channels=4, depth=3, dropout=0.2)
    model(torch.randn(2, 5, 16, 16)).square().mean().backward()
    first = model.encoder[0][0].weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0


def test_channels_last_forward_equals_contiguous():
    torch.manual_seed(0)
    model = UNet(5, 3, base_channels=4, depth=3).eval()
    x = torch.randn(2, 5, 16, 16)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
