"""The compiled kernels (csrc/, via fxdrop.ops.extension) against the dense references.

The C++ CPU extension is built once per session (cached in the user cache dir, so CI builds once).
Where a C++ compiler and ninja exist, a failed build is a test failure that shows the compiler
output; only a machine without them skips. Once built, ``import fxdrop`` loads it and
tests/test_ops.py runs on the compiled kernels; every check of test_ops.py runs again here on the
composite kernels, and the checks below run on both backends (``composite`` puts the composite
kernels back on the CPU key for the test).
"""

import functools
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxdrop.ops as ops
from fxdrop import patterns as P
from fxdrop.ops import extension
from fxdrop.ops import reference as ref

import test_ops
from test_ops import ACTS, _chain_case, _compare

HAVE_TOOLCHAIN = shutil.which(os.environ.get("CXX", "c++")) is not None and (
    shutil.which("ninja") is not None or (Path(sys.executable).parent / "ninja").exists())


@pytest.fixture(scope="session")
def compiled():
    """The CPU extension, built (or loaded from the cache) once per session."""
    if not HAVE_TOOLCHAIN:
        pytest.skip("no C++ compiler or ninja: the compiled kernels cannot be built here")
    if extension.disabled():
        pytest.skip("FXDROP_NO_EXT is set")
    try:
        extension.build("cpu", strict=True)
    except RuntimeError as error:
        pytest.fail(f"the C++ extension failed to build:\n{error}", pytrace=False)
    assert ("chain", "CPU") in extension.registered_kernels()
    return extension.backend_info()


@pytest.fixture(params=["composite", "compiled"])
def backend(request, compiled):
    if request.param == "composite":
        with extension.composite_kernels("CPU"):
            yield request.param
    else:
        yield request.param


@pytest.fixture
def composite_only(compiled):
    """For the tests re-run from test_ops.py: the composite kernels, whatever else is active.

    Once this module has built the extension, ``import fxdrop`` loads it, so tests/test_ops.py runs on
    the compiled kernels; its checks run here once more on the composite ones. Seeded, because their
    bf16 tolerance depends on the output-gradient draw.
    """
    torch.manual_seed(0)
    with extension.composite_kernels("CPU"):
        yield


def _check(out, expect, inputs, dtype, reference):
    """Op against the dense reference; bf16 against float64 with a tolerance scaled by each tensor's size.

    (bf16 rounds every intermediate at 2^-8: a few roundings deep, 4% of the largest entry plus about
    one bf16 step at 1.0 (for sums that cancel) is ample, and unlike a relative-norm test it does not
    fail on a lucky-exact reference.)
    """
    if dtype != torch.bfloat16:
        return _compare(out, expect, inputs, dtype)
    present = [t for t in inputs if t is not None]
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, present, grad)]
    exact_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    exact_out = reference(*exact_inputs)
    exact = [exact_out, *torch.autograd.grad(exact_out, [t for t in exact_inputs if t is not None], grad.double())]
    for g, e in zip(got, exact):
        assert g.shape == e.shape and g.dtype == torch.bfloat16
        err = (g.double() - e).abs().max().item()
        assert err <= 0.04 * e.abs().max().item() + 1e-2, f"bf16 error {err:.3g}, largest entry {e.abs().max():.3g}"


def _on_composite(test):
    """A copy of a test_ops.py test that runs on the composite kernels.

    The mark goes on a wrapper: marking ``test`` itself would also mark it in test_ops.py, where the
    fixture does not exist.
    """
    @functools.wraps(test)
    def run(*args, **kwargs):
        return test(*args, **kwargs)
    return pytest.mark.usefixtures("composite_only")(run)


# tests/test_ops.py, every check, on the composite kernels (test_ops.py itself runs on the compiled ones).
for _name in dir(test_ops):
    if _name.startswith("test_"):
        globals()[f"{_name}_composite"] = _on_composite(getattr(test_ops, _name))


def test_compiled_kernels_are_dispatched(compiled):
    assert compiled["cpu"] == "compiled" and compiled["reason"] is None
    for op in extension.COMPILED_OPS:
        table = torch._C._dispatch_dump(f"fxdrop::{op}")
        cpu_line = next(line for line in table.splitlines() if line.startswith("CPU:"))
        assert "kernels.cpp" in cpu_line, cpu_line
    with extension.composite_kernels("CPU"):
        assert extension.backend_info()["cpu"] == "composite"
        cpu_line = next(line for line in torch._C._dispatch_dump("fxdrop::chain").splitlines()
                        if line.startswith("CPU:"))
        assert "kernels.cpp" not in cpu_line
    assert extension.backend_info()["cpu"] == "compiled"


@pytest.mark.parametrize("family", ["row", "block"])
def test_unit_dropout_every_width_dp_offset(backend, family):
    """The C++ copy of the index math (kept units, fold-back, scale) equals fxdrop.patterns."""
    for n in (1, 2, 3, 5, 8, 13, 17):
        x = torch.randn(3, n, dtype=torch.float64)
        for dp in range(1, 9):
            for offset in range(dp):
                for scale in ("kept", "rate"):
                    pattern = torch.tensor([dp, offset])
                    got = ops.unit_dropout(x, pattern, family=family, scale=scale, p=0.3)
                    want = ref.unit_dropout(x, pattern, family=family, scale=scale, p=0.3)
                    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"n={n} dp={dp} offset={offset}")


def _random_chain(rng, family, dtype, lead, bias, dps=range(1, 9)):
    layers = rng.choice([1, 2, 3])
    inp = rng.random() < 0.5 or layers == 1
    outp = rng.random() < 0.5 or (layers == 1 and not inp)
    widths = [rng.choice([1, 3, 7, 10, 17, 24]) for _ in range(layers + 1)]
    x, weights, biases = _chain_case(widths, lead, dtype, bias, rng.randrange(2**31))
    sites = layers - 1 + inp + outp
    patterns = test_ops._patterns(sites, rng, dps)
    kw = dict(family=family, activations=[rng.choice(ACTS) for _ in range(layers - 1 + outp)],
              input_dropout=inp, output_dropout=outp, rates=[rng.choice([0.3, 0.5, 0.7]) for _ in range(sites)],
              scale=rng.choice(["kept", "rate"]))
    return x, weights, biases, patterns, kw


@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_chain_random_structures(backend, family, dtype, lead):
    rng = random.Random(f"{family}{dtype}{lead}")
    for trial in range(4):
        torch.manual_seed(trial)  # the output gradient: bf16 tolerances depend on the draw
        x, weights, biases, patterns, kw = _random_chain(rng, family, dtype, lead, bias=trial % 2 == 0)
        layers = len(weights)
        out = ops.chain(x, weights, biases, patterns, **kw)
        expect = ref.chain(x, weights, biases, patterns, **kw)
        _check(out, expect, [x, *weights, *biases], dtype,
               lambda x, *p: ref.chain(x, p[:layers], p[layers:], patterns, **kw))


@pytest.mark.parametrize("family", ["row", "block"])
def test_chain_gradcheck(backend, family):
    x, weights, biases = _chain_case([6, 11, 4], (2, 2), torch.float64, True, 7)
    for patterns in (torch.tensor([[3, 2], [2, 1], [5, 4]]), torch.tensor([[1, 0], [8, 7], [1, 0]])):
        kw = dict(family=family, activations=["leaky_relu:0.1", "elu:0.5"], input_dropout=True,
                  output_dropout=True, rates=[0.5, 0.3, 0.7], scale="rate")
        assert torch.autograd.gradcheck(lambda x, *p: ops.chain(x, p[:2], p[2:], patterns, **kw),
                                        (x, *weights, *biases))


@pytest.mark.parametrize("tile", [3, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tile_every_dp_offset(backend, tile, dtype):
    gen = torch.Generator().manual_seed(tile)
    torch.manual_seed(tile)
    for shape, lead in (((45, 70), (2, 5)), ((7, 3), (4,))) if tile < 32 else (((33, 65), (3,)),):
        x = torch.randn(*lead, shape[1], generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(*shape, generator=gen) / 8).to(dtype).requires_grad_()
        for bias in (True, False):
            b = torch.randn(shape[0], generator=gen).to(dtype).requires_grad_() if bias else None
            for dp in range(1, 9):
                for offset in range(dp):
                    pattern = torch.tensor([dp, offset])
                    kw = dict(tile=tile, p=0.5, scale="kept" if offset % 2 else "rate")
                    _check(ops.tile_linear(x, w, b, pattern, **kw), ref.tile_linear(x, w, b, pattern, **kw),
                           [x, w, b], dtype, lambda x, w, b: ref.tile_linear(x, w, b, pattern, **kw))


def test_tile_gradcheck(backend):
    x = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 13, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    for pattern in (torch.tensor([3, 1]), torch.tensor([8, 7])):
        assert torch.autograd.gradcheck(lambda *a: ops.tile_linear(*a, pattern, tile=4, p=0.5), (x, w, b))


def test_opcheck_compiled(compiled):
    x, weights, biases = _chain_case([17, 13, 11], (2, 3), torch.float32, True, 5)
    patterns = torch.tensor([[3, 1], [2, 0], [4, 1]])
    for family in ("row", "block"):
        torch.library.opcheck(torch.ops.fxdrop.chain.default,
                              (x, weights, biases, [True, True], patterns, family, ["silu", "relu"], True, True,
                               "kept", [0.5, 0.5, 0.5]))
        a, b = [[3, 1], [2, 0], [4, 1]], [[1, 0], [2, 1], [3, 0]]
        for classes in ([a, b, [[2, 0], [1, 0], [1, 0]]], [a, b, a, b]):  # 3 row classes; 4 merged to 2
            torch.library.opcheck(torch.ops.fxdrop.chain.default,
                                  (x, weights, biases, [True, True], torch.tensor(classes), family, ["silu", "relu"],
                                   True, True, "kept", [0.5, 0.5, 0.5]))
        torch.library.opcheck(torch.ops.fxdrop.unit_dropout.default, (x, patterns[0], family, "rate", 0.5))
    torch.library.opcheck(torch.ops.fxdrop.tile_linear.default, (x, weights[0], biases[0], patterns[0], 4,
                                                                  "kept", 0.5))


def test_weight_grad_is_dense_with_zeros_outside_the_kept_region(backend):
    """Row family: the kept columns are strided, so the gradient is written by the expand pass."""
    x, weights, biases = _chain_case([8, 12, 6], (5,), torch.float32, True, 4)
    out = ops.chain(x, weights, biases, torch.tensor([[3, 1]]), family="row", activations=["relu"], rates=[0.6])
    out.sum().backward()
    kept = P.kept("row", 12, 3, 1)
    dropped = torch.ones(12, dtype=torch.bool)
    dropped[kept] = False
    assert weights[0].grad[dropped].eq(0).all() and weights[1].grad[:, dropped].eq(0).all()
    assert biases[0].grad[dropped].eq(0).all() and weights[1].grad[:, kept].ne(0).any()


@pytest.mark.parametrize("family", ["row", "block"])
def test_weight_gradients_are_zero_exactly_outside_the_layouts_support(backend, family):
    """The kernels shrink what fxdrop.layout.ChainLayout says: every weight gradient is zero outside
    ``weight_support`` (and the values inside are the dense reference's: test_chain_random_structures)."""
    from fxdrop.layout import ChainLayout

    rng = random.Random(family)
    for trial in range(12):
        layers = rng.randint(1, 3)
        inp, outp = rng.random() < 0.5, rng.random() < 0.5
        if layers == 1 and not (inp or outp):
            inp = True
        layout = ChainLayout(layers, inp, outp)
        widths = [rng.randint(3, 12) for _ in range(layers + 1)]
        x, weights, biases = _chain_case(widths, (5,), torch.float64, True, trial)
        patterns = [[dp, rng.randrange(dp)] for dp in (rng.randint(1, 4) for _ in range(layout.sites))]
        out = ops.chain(x, weights, biases, torch.tensor(patterns), family=family,
                        activations=["none"] * layout.activations, input_dropout=inp, output_dropout=outp,
                        rates=[0.5] * layout.sites)
        out.sum().backward()
        for layer, weight in enumerate(weights):
            rows, cols = layout.weight_support(layer, tuple(weight.shape), family, patterns)
            inside = torch.zeros(weight.shape, dtype=torch.bool)
            inside[rows if rows is not None else slice(None), cols if cols is not None else slice(None)] = True
            grad = weight.grad
            assert grad[~inside].eq(0).all(), (trial, layer)


def test_errors_name_the_culprit_in_compiled_kernels(compiled):
    x, weights, biases = _chain_case([17, 13, 11], (6,), torch.float32, True, 3)
    kw = dict(family="block", activations=["relu"], rates=[0.5])
    with pytest.raises(ValueError, match=r"weights\[1\] expects 12 input features, but weights\[0\] gives 13"):
        ops.chain(x, [weights[0], torch.randn(11, 12)], biases, torch.tensor([[2, 0]]), **kw)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.chain(x, weights, biases, torch.tensor([[2, 0]]), family="block", activations=["swish"], rates=[0.5])
    with pytest.raises(ValueError, match="offset"):
        ops.tile_linear(x, weights[0], biases[0], torch.tensor([2, 5]), tile=4)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_cached_library_loads_at_import_without_compiling(compiled):
    """Loading is a dlopen: ``import fxdrop`` neither compiles nor imports the builder (no timing asserted)."""
    result = _python("""
        import warnings
        warnings.simplefilter("error")
        import torch
        import fxdrop
        info = fxdrop.backend_info()
        import sys
        assert "torch.utils.cpp_extension" not in sys.modules, "import compiled or imported the builder"
        assert "torch._dynamo" not in sys.modules, "import loaded Dynamo (seconds); the backend registers lazily"
        print(info["cpu"])
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["compiled"]


def test_wheel_ships_the_sources(tmp_path):
    """A regular (non-editable) install finds csrc/ inside the package (fxdrop/csrc links to it)."""
    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parent.parent
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(repo)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("fxdrop-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        names = set(archive.namelist())
    sources = {f"fxdrop/csrc/{name}" for name in extension._CPU_SOURCES + extension._CUDA_SOURCES + extension._HEADERS}
    assert sources <= names, sorted(sources - names)
    result = subprocess.run([sys.executable, "-c", "from fxdrop.ops import extension; print(extension.csrc_dir())"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "site" / "fxdrop" / "csrc"


def test_no_ext_env_gives_composite_without_warnings():
    result = _python("""
        import warnings
        warnings.simplefilter("error")
        import fxdrop
        from fxdrop.ops import extension
        assert extension.ensure_loaded() is None
        info = fxdrop.backend_info()
        assert info["cpu"] == "composite" and "FXDROP_NO_EXT" in info["reason"], info
    """, FXDROP_NO_EXT="1")
    assert result.returncode == 0, result.stderr


def test_failed_build_falls_back_with_one_warning_and_strict_shows_compiler_output(tmp_path):
    if not HAVE_TOOLCHAIN:
        pytest.skip("no C++ compiler")
    broken = tmp_path / "csrc"
    shutil.copytree(extension.csrc_dir(), broken)
    for source in ("structured.cpp", "cpu/kernels.cpp"):
        path = broken / source
        path.write_text("#error fxdrop deliberately broken\n")  # fails in milliseconds
    setup = f"""
        import warnings
        from pathlib import Path
        from fxdrop.ops import extension
        extension.csrc_dir = lambda: Path({str(broken)!r})
    """
    env = dict(FXDROP_CACHE=str(tmp_path / "cache"))
    fallback = _python(setup + """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert extension.ensure_loaded() is None
            assert extension.ensure_loaded() is None
        assert len(caught) == 1 and "composite" in str(caught[0].message), [str(w.message) for w in caught]
        assert extension.backend_info()["cpu"] == "composite"
    """, **env)
    assert fallback.returncode == 0, fallback.stdout + fallback.stderr
    strict = _python(setup + """
        extension.build("cpu", strict=True)
    """, **env)
    assert strict.returncode != 0 and "deliberately broken" in strict.stderr, strict.stderr[-3000:]


def test_convert_and_eager_ops_load_the_kernels_first(monkeypatch):
    """convert() and the eager op wrappers call ensure_loaded (a fresh machine builds there, not mid-trace)."""
    import fxdrop

    calls = []
    monkeypatch.setattr(extension, "ensure_loaded", lambda: calls.append(1))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    converted = fxdrop.convert(model, seed=0)
    assert calls, "convert() did not load the kernels"
    calls.clear()
    converted.train()(torch.randn(4, 6))
    assert calls, "the chain op wrapper did not load the kernels"
    calls.clear()
    fxdrop.convert(torch.nn.Sequential(torch.nn.Linear(6, 3)))
    assert not calls, "a model with nothing to convert needs no kernels"


def test_row_class_weight_gradients_of_wide_weights_match_the_dense_reference(backend):
    """Row classes add their products into one dense weight gradient: the first class with rows writes
    its region and zeroes the rest, the others add. Eight classes whose regions start and stop anywhere
    (one keeps nothing at site 0), on weights much wider than the other tests': every gradient must be the
    dense reference's, zeros included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16384, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = [(torch.randn(*shape, generator=gen, dtype=torch.float64) / 64).requires_grad_()
               for shape in ((72, 16384), (16384, 72), (5, 16384))]
    biases = [torch.randn(w.shape[0], generator=gen, dtype=torch.float64).requires_grad_() for w in weights]
    classes = torch.tensor([[[3, 1], [2, 0]], [[4, 3], [4, 1]], [[2, 0], [3, 2]], [[1, 0], [2, 1]],
                            [[5, 2], [1, 0]], [[3, 0], [8, 7]], [[100, 99], [3, 1]], [[4, 0], [4, 2]]])
    kw = dict(family="block", activations=["relu", "gelu"], rates=[0.6, 0.6])
    out = ops.chain(x, weights, biases, classes, **kw)
    expect = ref.chain_classes(x, weights, biases, classes, **kw)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    inputs = [x, *weights, *biases]
    got, want = torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expect, inputs, grad)
    torch.testing.assert_close(out, expect)
    for name, a, b in zip(["x", "w0", "w1", "w2", "b0", "b1", "b2"], got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad {name}: {m}")
        assert torch.equal(a == 0, b == 0) or name == "x", f"grad {name}: zeros differ"
