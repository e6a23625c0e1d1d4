"""fxdrop.allocator: the opt-in glibc setting takes effect in a fresh process and is recorded."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_retain_freed_memory_in_a_fresh_process():
    code = textwrap.dedent("""
        from fxdrop import allocator
        from fxdrop.timing import machine_info
        assert not allocator.retained() and machine_info()["retain_freed_memory"] is False
        assert allocator.retain_freed_memory() is True
        assert allocator.retained() and machine_info()["retain_freed_memory"] is True
        import torch
        for _ in range(3):  # big blocks still allocate, free and compute correctly
            a = torch.ones(3000, 3000)
            assert float(a.sum()) == 9e6
            del a
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
