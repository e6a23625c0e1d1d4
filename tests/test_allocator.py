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
