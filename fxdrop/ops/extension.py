"""The compiled kernels of the ``fxdrop`` ops (``csrc/``): build, cache, load, and say what is active.

``csrc/`` registers C++ kernels for the ``CPU`` key (and, in the CUDA build, the ``CUDA`` key) of ops
whose schemas :mod:`fxdrop.ops.schema` declares; the composite kernels stay registered for
``CompositeExplicitAutograd``, so a compiled kernel wins on its device and the composite one runs
everywhere else. Fake kernels and autograd rules stay in Python.

Build: ``torch.utils.cpp_extension.load`` with ninja, into a cache directory keyed by the sources'
hash, the torch version and the Python version (``$FXDROP_CACHE``, else ``$XDG_CACHE_HOME/fxdrop``,
else ``~/.cache/fxdrop``). ``python -m fxdrop.build`` prebuilds. ``FXDROP_NO_EXT=1`` disables.

- :func:`load_cached` (run when this module is imported, so by ``import fxdrop``): loads an already
  built library, a ``dlopen`` of a few ms; never compiles, never imports ``cpp_extension``.
- :func:`ensure_loaded` (first use of an op): builds if needed, then loads. A failed build (no
  compiler, no ninja, a compile error) falls back to the composite kernels with one warning; it
  never raises (``build(strict=True)`` does, with the compiler output).
- :func:`registered_kernels` / :func:`backend_info`: which ``(op, dispatch key)`` run compiled code.
- :func:`composite_kernels`: a context manager that puts the composite kernels back on a device
  key for a while (the tests compare the two; ``fxdrop bench --kernels composite`` times the composite
  kernels in training runs, with ``FXDROP_NO_EXT=1`` in the fxdrop blocks).

Imports torch and :mod:`fxdrop.ops.composite` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch

# Ops csrc registers kernels for, per dispatch key (keep in step with the TORCH_LIBRARY_IMPL blocks).
COMPILED_OPS = ("chain", "chain_backward", "unit_dropout", "tile_linear", "tile_linear_backward")
_CPU_SOURCES = ("structured.cpp", "cpu/kernels.cpp")
_CUDA_SOURCES = _CPU_SOURCES + ("cuda/kernels.cu",)
_HEADERS = ("structured.h", "activation.h", "cuda/tile_gemm.cuh")
_CFLAGS = ["-O3"]  # the C++ standard is torch's choice (C++17 up to 2.13, C++20 from 2.14)
# No --use_fast_math: the epilogues' erf/exp/tanh must match ATen's to the tests' tolerances. The
# target architecture comes from TORCH_CUDA_ARCH_LIST (cpp_extension reads it; default: the visible
# GPU's, or 9.0 when there is none). FXDROP_NVCC_FLAGS adds flags (e.g. -Xptxas -v).
_CUDA_CFLAGS = ["-O3", "-lineinfo"]


def _cuda_cflags() -> list[str]:
    return _CUDA_CFLAGS + os.environ.get("FXDROP_NVCC_FLAGS", "").split()

_lock = threading.RLock()
_state: dict = {"variant": None, "library": None, "reason": None, "warned": False, "tried_build": False}


def csrc_dir() -> Path | None:
    """``csrc/`` of a source checkout (``<repo>/csrc``) or of an installed package (``fxdrop/csrc``)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "structured.cpp").is_file():
            return candidate
    return None


def cache_root() -> Path:
    if os.environ.get("FXDROP_CACHE"):
        return Path(os.environ["FXDROP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxdrop"


def disabled() -> bool:
    return os.environ.get("FXDROP_NO_EXT", "").strip() not in ("", "0")


def _variants() -> tuple[str, ...]:
    """Builds worth having on this torch: the CUDA one (which also holds the CPU kernels) first."""
    return ("cuda", "cpu") if torch.version.cuda is not None else ("cpu",)


def _sources(variant: str) -> list[Path]:
    root = csrc_dir()
    assert root is not None  # internal: callers check
    return [root / s for s in (_CUDA_SOURCES if variant == "cuda" else _CPU_SOURCES)]


def _target(variant: str) -> tuple[str, Path]:
    """Library name and build directory for ``variant``: keyed by sources, flags, torch and Python."""
    root = csrc_dir()
    assert root is not None
    digest = hashlib.sha256()
    for rel in sorted(set((_CUDA_SOURCES if variant == "cuda" else _CPU_SOURCES) + _HEADERS)):
        path = root / rel
        if path.is_file():
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if variant == "cuda" else ""
    digest.update(repr((_CFLAGS, _cuda_cflags() if variant == "cuda" else None, arch)).encode())
    key = digest.hexdigest()[:16]
    name = f"fxdrop_{variant}_{key}"
    tag = f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}".replace("+", "_")
    return name, cache_root() / tag / name


def _library_path(variant: str) -> Path:
    name, directory = _target(variant)
    return directory / f"{name}.so"


def _load_library(variant: str, path: Path) -> None:
    torch.ops.load_library(str(path))
    _state.update(variant=variant, library=str(path), reason=None)


def load_cached() -> str | None:
    """Load an already built library if there is one (fast); returns the variant loaded or None."""
    with _lock:
        if _state["variant"] is not None or disabled() or csrc_dir() is None:
            return _state["variant"]
        for variant in _variants():
            path = _library_path(variant)
            if path.is_file():
                try:
                    _load_library(variant, path)
                    return variant
                except OSError as error:  # a stale or foreign build: rebuild on first use
                    _state["reason"] = f"cached library {path} failed to load: {error}"
        return None


def build(variant: str = "cpu", *, strict: bool = False, verbose: bool = False) -> Path | None:
    """Compile ``variant`` ("cpu" or "cuda") into the cache and load it; returns the library path.

    ``strict=True`` raises ``RuntimeError`` with the compiler's output when the build fails; otherwise
    the failure is recorded in :func:`backend_info` and None is returned.
    """
    if variant not in ("cpu", "cuda"):
        raise ValueError(f"unknown extension variant {variant!r}; expected 'cpu' or 'cuda'")
    with _lock:
        if _state["variant"] is not None:
            if _state["variant"] == variant or (variant == "cpu" and _state["variant"] == "cuda"):
                return Path(_state["library"])
            raise RuntimeError(f"the {_state['variant']} extension is already loaded in this process; "
                               f"build the {variant} one in a fresh process")
        try:
            problem = _missing_tools(variant)
            if problem:
                raise RuntimeError(problem)
            name, directory = _target(variant)
            path = directory / f"{name}.so"
            if not path.is_file():
                directory.mkdir(parents=True, exist_ok=True)
                _compile(variant, name, directory, verbose)
            _load_library(variant, path)
            return path
        except Exception as error:  # noqa: BLE001 - any build failure means: use the composite kernels
            _state["reason"] = f"{variant} build failed: {error}"
            if strict:
                raise RuntimeError(f"fxdrop: building the {variant} extension failed:\n{error}") from error
            return None


def _missing_tools(variant: str) -> str | None:
    if csrc_dir() is None:
        return "csrc/ sources not found (not a source checkout, and not packaged)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        return "ninja not found (pip install ninja)"
    if variant == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None:
            return "this torch has no CUDA"
        if CUDA_HOME is None:
            return "no CUDA toolkit (set CUDA_HOME, nvcc on PATH)"
    return None


def _compile(variant: str, name: str, directory: Path, verbose: bool) -> None:
    from torch.utils import cpp_extension  # slow import: only when compiling

    # ninja may live next to the interpreter (a venv) without being on PATH.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    include = [str(csrc_dir())]
    if variant == "cuda":
        include += _cuda_include_dirs()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: build for Hopper
    cpp_extension.load(
        name=name, sources=[str(s) for s in _sources(variant)], extra_cflags=list(_CFLAGS),
        extra_cuda_cflags=_cuda_cflags() if variant == "cuda" else None, extra_include_paths=include,
        build_directory=str(directory), verbose=verbose, with_cuda=variant == "cuda", is_python_module=False)


def _cuda_include_dirs() -> list[str]:
    """CUDA 13 wheels keep the toolkit headers ATen/cuda needs under ``site-packages/nvidia/cu13``."""
    found = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            path = Path(entry) / sub
            if path.is_dir():
                found.append(str(path))
    return found


def ensure_loaded() -> str | None:
    """At first use: load the cached library or build it; one warning if the build fails.

    Returns the active variant ("cuda", "cpu") or None (composite kernels only). Never raises.
    """
    if _state["variant"] is not None or _state["tried_build"]:
        return _state["variant"]
    with _lock:
        if _state["variant"] is not None or _state["tried_build"]:
            return _state["variant"]
        _state["tried_build"] = True
        if disabled():
            _state["reason"] = "disabled by FXDROP_NO_EXT"
            return None
        if load_cached() is not None:
            return _state["variant"]
        print(f"fxdrop: compiling the C++ kernels once (about 30 s per variant; cached in {cache_root()}; "
              "`python -m fxdrop.build` prebuilds, FXDROP_NO_EXT=1 skips)", file=sys.stderr, flush=True)
        for variant in _variants():
            if build(variant) is not None:
                if variant == "cpu" and torch.version.cuda is not None:
                    _warn_once(f"CUDA kernels unavailable ({_state.get('cuda_reason')}); "
                               "using compiled CPU kernels and composite CUDA kernels")
                return variant
            if variant == "cuda":
                _state["cuda_reason"] = _state["reason"]
        _warn_once(f"compiled kernels unavailable ({_first_line(_state['reason'])}); using the composite "
                   "PyTorch kernels. Run `python -m fxdrop.build` to see the compiler output.")
        return None


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text else "unknown reason"


def _warn_once(message: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"fxdrop: {message}", RuntimeWarning, stacklevel=3)


def registered_kernels() -> set[tuple[str, str]]:
    """``(op, dispatch key)`` pairs that run compiled kernels in this process, e.g. ``("chain", "CPU")``."""
    keys = {"cpu": ("CPU",), "cuda": ("CPU", "CUDA")}.get(_state["variant"], ())
    overridden = _overridden
    return {(op, key) for op in COMPILED_OPS for key in keys if key not in overridden}


def backend_info() -> dict:
    """Which kernels the ``fxdrop`` ops run here: per device, ``"compiled"`` or ``"composite"``.

    Also the library path, the compiled ``(op, key)`` pairs, and why compiled kernels are missing.
    """
    kernels = registered_kernels()
    keys = {key for _, key in kernels}
    return {
        "cpu": "compiled" if "CPU" in keys else "composite",
        "cuda": ("compiled" if "CUDA" in keys else "composite") if torch.version.cuda is not None else "unavailable",
        "kernels": sorted(f"{op}/{key}" for op, key in kernels),
        "library": _state["library"],
        "reason": None if kernels else (_state["reason"] or ("disabled by FXDROP_NO_EXT" if disabled()
                                                             else "not built yet (built at first use)")),
    }


_overridden: set[str] = set()


@contextlib.contextmanager
def composite_kernels(key: str = "CPU") -> Iterator[None]:
    """Run the composite kernels on dispatch ``key`` inside the block, even where compiled ones exist.

    Registers the composite functions for ``key`` from a temporary library (the dispatcher's newest
    registration wins) and removes them on exit, which brings the compiled kernels back.
    """
    from . import composite

    if key in _overridden:
        yield
        return
    library = torch.library.Library("fxdrop", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
            for op in COMPILED_OPS:
                library.impl(op, getattr(composite, op), key)
        _overridden.add(key)
        yield
    finally:
        _overridden.discard(key)
        library._destroy()


load_cached()
