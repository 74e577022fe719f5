"""The 1x1 convolutions as one matrix product over NHWC rows: the same outputs, without torch's native NCHW path."""
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from model import build_rtmdet
from model.inference.accelerate import EagerRunner, build_runner
from model.inference.pointwise import PointwiseConv2d, eligible, with_pointwise_gemm
from model.inference.preprocess import Normalizer
from model.inference.runner_choice import PEAK_TOLERANCE, peak_relative_error
from model.nn.rtmdet import fused_for_inference
from model.testing import fill_deterministic

# torch's native convolution (its THNN path) shows up in the profiler under these names.
NATIVE_CONV_OPS = {"aten::_slow_conv2d_forward", "aten::thnn_conv2d"}


@pytest.fixture
def threads():
    """Set torch's thread count for one test, and put it back after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def pointwise_conv(c, k, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c, k, 1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * c ** -0.5)
        if bias:
            conv.bias.copy_(torch.randn(k, generator=g))
    return conv


@pytest.mark.parametrize(("c", "k", "batch", "hw", "bias"), [
    (96, 96, 1, (20, 20), True),
    (48, 80, 3, (13, 7), True),   # a batch, an odd map, more outputs than inputs
    (384, 384, 1, (1, 1), True),  # the channel attention's 1x1 map
    (24, 48, 2, (9, 11), False),  # no bias
])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_the_product_gives_the_convolution(threads, c, k, batch, hw, bias, n_threads):
    threads(n_threads)
    conv = pointwise_conv(c, k, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = conv(x), PointwiseConv2d(conv)(x)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6


def test_on_one_thread_the_native_path_is_gone_and_elsewhere_the_convolution_runs(threads):
    conv = pointwise_conv(96, 96)
    swapped = PointwiseConv2d(conv)
    x = torch.randn(1, 96, 20, 20).contiguous(memory_format=torch.channels_last)
    threads(1)
    with torch.inference_mode():
        assert NATIVE_CONV_OPS & ops_run(lambda: conv(x))  # what torch itself does here: its native path
        assert not NATIVE_CONV_OPS & ops_run(lambda: swapped(x))
        assert "aten::addmm" in ops_run(lambda: swapped(x))
        # An NCHW input, or a batch of 16 (where torch takes oneDNN itself), stays the convolution's.
        assert NATIVE_CONV_OPS & ops_run(lambda: swapped(x.contiguous()))
        assert "aten::addmm" not in ops_run(lambda: swapped(x.expand(16, -1, -1, -1).contiguous(
            memory_format=torch.channels_last)))
    threads(2)
    with torch.inference_mode():
        assert "aten::addmm" not in ops_run(lambda: swapped(x))


def test_only_plain_1x1_convolutions_are_swapped():
    assert eligible(nn.Conv2d(8, 8, 1))
    for conv in (nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, groups=2),
                 nn.Conv2d(8, 8, 1, padding=1), nn.Conv2d(8, 8, 1).double()):
        assert not eligible(conv)
        with pytest.raises(ValueError, match="1x1"):
            PointwiseConv2d(conv)


def test_the_served_eager_runner_swaps_the_1x1s_and_gives_the_reference_outputs(threads, monkeypatch):
    threads(1)
    net = fused_for_inference(fill_deterministic(build_rtmdet("tiny", num_classes=3), 1))
    net = net.to(memory_format=torch.channels_last)
    ones = sum(1 for m in net.modules() if eligible(m))
    normalize = Normalizer(torch.device("cpu"), channels_last=True)
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    served = build_runner("eager", net, normalize, x, (8, 16, 32), threads=1)
    reference = EagerRunner(net, normalize)
    assert served.pointwise_convs == ones > 40 and reference.pointwise_convs == 0 and reference.net is net
    assert not any(isinstance(m, PointwiseConv2d) for m in net.modules())  # the original is untouched
    assert peak_relative_error(served(x), reference(x)) <= PEAK_TOLERANCE
    assert not NATIVE_CONV_OPS & ops_run(lambda: served(x))
    # Without Winograd the 1x1s are still swapped, in a copy.
    monkeypatch.setenv("RTMDET_WINOGRAD", "0")
    plain = build_runner("eager", net, normalize, x, (8, 16, 32), threads=1)
    assert plain.winograd_convs == 0 and plain.pointwise_convs == ones and plain.net is not net
    assert peak_relative_error(plain(x), reference(x)) <= 1e-6


def test_with_pointwise_gemm_leaves_the_network_it_copies_alone():
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1))
    copied, n = with_pointwise_gemm(net)
    assert n == 2 and isinstance(copied[0], PointwiseConv2d) and isinstance(copied[3], PointwiseConv2d)
    assert type(net[0]) is nn.Conv2d and type(net[3]) is nn.Conv2d
    same, m = with_pointwise_gemm(net, inplace=True)
    assert same is net and m == 2 and isinstance(net[0], PointwiseConv2d)
