"""fxdrop.allocator: the opt-in glibc setting takes effect (freed big blocks stop costing page faults)."""

import subprocess
import sys
import textwrap

import pytest

_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from fxdrop import allocator
    if sys.argv[1] == "retain":
        assert allocator.retain_freed_memory() is True and allocator.retained()
    else:
        assert not allocator.retained()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(8 << 20).sum()  # warm up: the first block faults in either way
    before = faults()
    for _ in range(5):  # 32 MiB, above glibc's mmap threshold: fresh pages each time unless retained
        a = torch.ones(8 << 20)
        assert float(a[::4096].sum()) == (8 << 20) / 4096
        del a
    print(faults() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_retained_memory_is_reused_without_page_faults():
    def faults(mode):
        result = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip().splitlines()[-1])

    default, retained = faults("default"), faults("retain")
    pages = 5 * (32 << 20) // 4096
    assert default > pages // 4, f"default glibc took only {default} faults for {pages} fresh pages"
    # Retained: at most the first cycle's block is fresh (measured 8.2k faults against 41k).
    assert retained <= pages // 5 + 1024 and retained < default // 3, f"retained: {retained}, default: {default}"


_POOL = textwrap.dedent("""
    import resource
    import torch
    import fxdrop
    torch.manual_seed(0)
    # Weight gradients of 16 MiB: with zero_grad(set_to_none=True) each step frees them, and glibc
    # would hand the next step fresh pages; fxdrop's resident pool gives the freed buffers back.
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(2048, 2048))
    model = fxdrop.convert(model, granularity="{granularity}")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 2048)
    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts are read the Linux way")
@pytest.mark.parametrize("granularity", ["forward", "rows"])
def test_weight_gradients_reuse_resident_pages(granularity):
    from fxdrop.ops import extension

    if ("chain", "CPU") not in extension.registered_kernels():
        pytest.skip("the C++ extension is not built here (tests/test_extension.py builds it)")
    result = subprocess.run([sys.executable, "-c", _POOL.format(granularity=granularity)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    faults = int(result.stdout.strip().splitlines()[-1])
    gradient_pages = 5 * 2 * (16 << 20) // 4096  # two 16 MiB weight gradients a step, five steps
    # Measured: ~1.2k faults over five steps with the pool, ~42k with fresh gradient pages.
    assert faults < gradient_pages // 8, f"{faults} page faults for {gradient_pages} gradient pages"
