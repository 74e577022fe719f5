"""Winograd F(4x4, 3x3) computes the convolution it replaces, and only replaces the ones it can."""
import pytest
import torch
from torch import nn

from model import build_rtmdet
from model.inference.runner_choice import PEAK_TOLERANCE, peak_relative_error
from model.inference.winograd import MIN_CHANNELS, WinogradConv2d, eligible, with_winograd
from model.nn.rtmdet import fused_for_inference
from model.testing import fill_deterministic


def conv_and_input(c, k, h, w, batch=1, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c, k, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / (9 * c)) ** 0.5)
        if bias:
            conv.bias.copy_(torch.randn(k, generator=g))
    return conv, torch.randn(batch, c, h, w, generator=g)


@pytest.mark.parametrize(("c", "k", "h", "w", "batch", "bias"), [
    (96, 96, 20, 20, 1, True),    # whole tiles
    (64, 128, 13, 7, 2, True),    # partial tiles at both far edges, a batch, more outputs than inputs
    (128, 64, 3, 5, 1, False),    # smaller than one tile; no bias
    (96, 96, 12, 20, 3, True),    # a tight canvas's landscape map
])
def test_winograd_gives_the_direct_convolution(c, k, h, w, batch, bias):
    conv, x = conv_and_input(c, k, h, w, batch, bias)
    with torch.no_grad():
        want = conv(x)
        got = WinogradConv2d(conv)(x)
        got_nhwc = WinogradConv2d(conv)(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape == got_nhwc.shape
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2e-5, err  # float32 rounding of the transforms' fractions, not a wrong tap (that is ~1)
    assert torch.equal(got, got_nhwc)


def test_winograd_refuses_what_it_does_not_compute():
    for conv in (nn.Conv2d(96, 96, 3, stride=2, padding=1), nn.Conv2d(96, 96, 5, padding=2),
                 nn.Conv2d(96, 96, 3, padding=1, groups=96), nn.Conv2d(96, 96, 3, padding=0),
                 nn.Conv2d(96, 96, 3, padding=2, dilation=2)):
        assert not eligible(conv, min_channels=1)
        with pytest.raises(ValueError, match="stride-1 padding-1 3x3"):
            WinogradConv2d(conv)
    assert not eligible(nn.Conv2d(MIN_CHANNELS - 1, 256, 3, padding=1))  # too narrow to pay
    assert eligible(nn.Conv2d(MIN_CHANNELS, MIN_CHANNELS, 3, padding=1))


def test_with_winograd_swaps_a_copy_and_keeps_the_network_s_outputs():
    model = fill_deterministic(build_rtmdet("tiny", num_classes=3), 1)
    net = fused_for_inference(model)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    swapped_net, swapped = with_winograd(net)
    # RTMDet-tiny: the wide stride-1 3x3 convolutions are the head's (2 stacked, cls and reg, 3 levels = 12),
    # and 8 in the backbone's and neck's blocks of 96 and 192 channels.
    assert swapped == sum(isinstance(m, WinogradConv2d) for m in swapped_net.modules()) == 20
    assert not any(isinstance(m, WinogradConv2d) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 50
    with torch.no_grad():
        assert peak_relative_error(swapped_net(x), net(x)) <= PEAK_TOLERANCE
