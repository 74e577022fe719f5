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
    (40, 72, 30, 22, 2, True),    # channels not a multiple of the 16 lanes nor outputs of the 32-wide panels;
                                  # 96 tiles: four blocks of 24 on one thread, eight of 12 on two
    (96, 40, 17, 19, 1, True),    # 25 tiles: on two threads four blocks of 6 and a last one of a single tile
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


def test_the_fused_silu_is_torch_s_silu():
    conv, x = conv_and_input(64, 80, 11, 9, batch=2)
    with torch.no_grad():
        conv.bias.mul_(8)  # outputs far into both tails, where SiLU is 0 and x: the exp's clamping is reached
        plain = WinogradConv2d(conv)(x)
        fused = WinogradConv2d(conv, silu=True)(x)
    assert plain.min() < -20 and plain.max() > 20
    want = nn.functional.silu(plain)
    assert ((fused - want).abs() / want.abs().clamp_min(1e-3)).max() < 1e-5  # its own exp: a few float32 ulps


def test_the_blocks_split_over_threads_give_the_same_bits():
    conv, x = conv_and_input(96, 96, 23, 30, batch=2)
    wino = WinogradConv2d(conv, silu=True)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(wino(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*outs)  # each block of tiles is one thread's alone, cut the same way: no sum changes order


def test_the_kernel_uses_torch_s_openmp_runtime():
    """Built with OpenMP, the library must bind to the libgomp torch loaded, not a second runtime with its own
    threads (which would oversubscribe the cores and ignore torch's thread count and wait policy)."""
    from model.inference import winograd

    library = winograd.KERNELS.load()
    assert library is not None
    with open("/proc/self/maps") as f:
        maps = [line.split()[-1] for line in f if "libgomp" in line]
    assert len(set(maps)) == 1 and "torch" in maps[0], sorted(set(maps))


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
    # RTMDet-tiny: the stride-1 3x3 convolutions of 24 channels or more are the head's (2 stacked, cls and reg, 3
    # levels = 12), and 11 in the backbone's and neck's blocks of 24 to 192 channels (not the stem's 12 -> 24).
    assert swapped == sum(isinstance(m, WinogradConv2d) for m in swapped_net.modules()) == 23
    # Every one of them sits in a ConvModule, whose SiLU moved into the output transform.
    assert sum(isinstance(m, WinogradConv2d) and m.silu for m in swapped_net.modules()) == 23
    assert sum(isinstance(m, nn.SiLU) for m in swapped_net.modules()) == sum(
        isinstance(m, nn.SiLU) for m in net.modules()) - 23
    assert not any(isinstance(m, WinogradConv2d) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 50
    with torch.no_grad():
        assert peak_relative_error(swapped_net(x), net(x)) <= PEAK_TOLERANCE


def test_the_eager_runner_build_runner_makes_runs_winograd_and_the_reference_does_not(monkeypatch):
    from model.inference.accelerate import EagerRunner, build_runner
    from model.inference.preprocess import Normalizer

    net = fused_for_inference(fill_deterministic(build_rtmdet("tiny", num_classes=3), 1))
    normalize = Normalizer(torch.device("cpu"), channels_last=False)
    x = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    served = build_runner("eager", net, normalize, x, (8, 16, 32), threads=1)
    reference = EagerRunner(net, normalize)
    assert served.winograd_convs == 23 and reference.winograd_convs == 0 and reference.net is net
    assert 0 < peak_relative_error(served(x), reference(x)) <= PEAK_TOLERANCE  # not the same code path
    monkeypatch.setenv("RTMDET_WINOGRAD", "0")
    assert build_runner("eager", net, normalize, x, (8, 16, 32), threads=1).winograd_convs == 0


def test_without_a_c_compiler_the_convolutions_stay_direct_with_a_warning(monkeypatch, tmp_path):
    from model.inference import winograd

    monkeypatch.setenv("RTMDET_HOME", str(tmp_path))  # no library built earlier to fall back on
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(winograd, "KERNELS", winograd.KernelBuild())
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    with pytest.warns(UserWarning, match="Winograd convolutions off: FileNotFoundError"):
        same, swapped = with_winograd(net)
    assert same is net and swapped == 0


def test_a_compiler_without_openmp_builds_the_one_thread_kernel(monkeypatch, tmp_path):
    """A C compiler that refuses -fopenmp (clang without libomp) still gets the convolutions, one thread."""
    import shutil

    from model.inference import winograd

    real = shutil.which("cc") or shutil.which("gcc")
    fake = tmp_path / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("RTMDET_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setattr(winograd, "KERNELS", winograd.KernelBuild())
    assert winograd.KERNELS.load() is not None, winograd.KERNELS.error
    (library,) = (tmp_path / "kernels").glob("winograd_f43-*.so")
    assert b"libgomp" not in library.read_bytes()  # the second try, without OpenMP
    conv, x = conv_and_input(64, 64, 17, 19, batch=2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            got, want = WinogradConv2d(conv)(x), conv(x)
    finally:
        torch.set_num_threads(before)
    assert (got - want).abs().max() / want.abs().max() < 2e-5


def test_the_library_is_built_once_per_cache_folder(monkeypatch, tmp_path):
    from model.inference import winograd

    monkeypatch.setenv("RTMDET_HOME", str(tmp_path))
    monkeypatch.setattr(winograd, "KERNELS", winograd.KernelBuild())
    assert winograd.KERNELS.load() is not None
    (built,) = (tmp_path / "kernels").glob("winograd_f43-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(winograd, "KERNELS", winograd.KernelBuild())  # a new process, as it were
    assert winograd.KERNELS.load() is not None
    assert built.stat().st_mtime_ns == stamp and list((tmp_path / "kernels").iterdir()) == [built]


def test_an_unwritable_home_builds_in_a_private_temp_folder(monkeypatch, tmp_path):
    from model.inference import winograd

    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache folder would be: no folder can be made under it")
    monkeypatch.setenv("RTMDET_HOME", str(blocker / "rtmdet"))
    monkeypatch.setattr(winograd.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    folder = winograd.kernel_dir()
    assert folder.parent == tmp_path / "tmp" and folder.stat().st_mode & 0o777 == 0o700
    monkeypatch.setattr(winograd, "KERNELS", winograd.KernelBuild())
    assert winograd.KERNELS.load() is not None and list(folder.glob("winograd_f43-*.so"))
    folder.chmod(0o777)  # anyone could plant a library there: refused
    with pytest.raises(PermissionError, match="not this user's alone"):
        winograd.kernel_dir()


def test_the_compiled_graph_s_custom_op_is_the_eager_convolution():
    from model.inference import winograd

    winograd.register_compiled_ops()
    conv, x = conv_and_input(64, 96, 9, 14, batch=2)
    xh = x.permute(0, 2, 3, 1)  # NHWC; 9 x 14 is 3 x 4 tiles of 4, the last ones partly padding
    wino = WinogradConv2d(conv)
    for silu in (False, True):
        assert torch.equal(torch.ops.rtmdet.winograd_conv(xh, wino.u, wino.bias, 96, silu),
                           winograd.winograd_conv(xh, wino.u, wino.bias, 96, silu))
    # Its registered shape, schema and fake (tracing) version agree with what it computes.
    torch.library.opcheck(torch.ops.rtmdet.winograd_conv.default, (xh, wino.u, wino.bias, 96, True))
