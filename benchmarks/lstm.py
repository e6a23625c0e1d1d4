"""Whole training step of the PTB word LM: standard dropout vs fxdrop, at p = 0.3, 0.5, 0.7.

The model is ``examples/ptb_lstm.py``'s (Embedding -> Dropout -> 2-layer LSTM with dropout -> Dropout ->
Linear decoder; Zaremba et al. medium: hidden 650, vocabulary 10,000, BPTT 35, batch 20, fp32). A step is
forward, loss, backward, gradient clipping and the SGD update, on token batches drawn once from a fixed
generator. Both models start from the same weights; their steps alternate (order flipped every pair) and
the figure is the median of the paired ratios (standard / fxdrop), so load from other processes hits both
sides alike. The ratio of the summed times (throughput) is reported too: with three sites each drawing
``dp`` per step, single steps vary a lot.

FLOP ideal: ``fxdrop.audit``'s Amdahl over the step's GEMM FLOPs (forward, input- and weight-gradient
GEMMs): the input GEMMs of every LSTM layer and the decoder shrink to ``1 - p`` in expectation, the
recurrent GEMMs do not. Efficiency = measured speedup / ideal.

    python benchmarks/lstm.py [--hidden 650] [--pairs 20] [--families row block] [--quick]

Writes ``benchmarks/results/lstm.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fxdrop.audit import ideal_speedup
from fxdrop.scheduler import ROW_CLASSES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _example():
    """``examples/ptb_lstm.py`` as a module: the benchmark times exactly the example's models and step."""
    spec = importlib.util.spec_from_file_location("ptb_lstm", ROOT / "examples" / "ptb_lstm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired_times(baseline, candidate, pairs: int, warmup: int) -> list[tuple[float, float]]:
    """``(baseline seconds, candidate seconds)`` for ``pairs`` interleaved pairs, after ``warmup`` of each."""
    for _ in range(warmup):
        baseline()
        candidate()
    times = []
    for i in range(pairs):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        took = {}
        for fn in order:
            start = time.perf_counter()
            fn()
            took[fn] = time.perf_counter() - start
        times.append((took[baseline], took[candidate]))
    return times


def make_steps(example, *, hidden: int, vocab: int, layers: int, bptt: int, batch: int, p: float, family: str,
               seed: int = 0, granularity: str = "rows"):
    torch.manual_seed(seed)
    standard = example.WordLM(vocab, hidden, layers, p)
    structured = example.fxdrop_model(copy.deepcopy(standard), p=p, family=family, seed=seed,
                                      granularity=granularity)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (bptt + 1, batch), generator=gen)
    inputs, targets = tokens[:-1], tokens[1:]

    def stepper(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        state = {"hidden": None}

        def step():
            _, state["hidden"] = example.train_step(model, optimizer, inputs, targets, state["hidden"], 5.0)
        return step

    ideal = ideal_speedup(standard, (inputs,), p=p, pattern=family)
    return stepper(standard), stepper(structured), structured.fxdrop_conversion, ideal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=650)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--families", nargs="+", default=["row", "block"], choices=["row", "block"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is steadier on a machine shared with other jobs)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="fxdrop.allocator.retain_freed_memory() first (both models alike)")
    parser.add_argument("--granularity", choices=("rows", "forward"), default="rows",
                        help="the decoder site's patterns: per token row (examples/ptb_lstm.py's default) or one per "
                             "forward")
    parser.add_argument("--quick", action="store_true", help="hidden 200, 5 pairs (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "lstm.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.pairs, args.warmup = 200, 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory:
        from fxdrop.allocator import retain_freed_memory

        retain_freed_memory()
    example = _example()
    console = Console()
    rows = []
    load_before = os.getloadavg()
    for p in args.rates:
        for family in args.families:
            standard, structured, conversion, ideal = make_steps(
                example, hidden=args.hidden, vocab=args.vocab, layers=args.layers, bptt=args.bptt,
                batch=args.batch, p=p, family=family, granularity=args.granularity)
            times = paired_times(standard, structured, args.pairs, args.warmup)
            ratios = [a / b for a, b in times]
            speedup = statistics.median(ratios)
            throughput = sum(a for a, _ in times) / sum(b for _, b in times)
            rows.append({"p": p, "family": family, "speedup": speedup, "throughput_speedup": throughput,
                         "ideal": ideal, "efficiency": speedup / ideal,
                         "standard_ms": 1e3 * statistics.median(a for a, _ in times),
                         "fxdrop_ms": 1e3 * statistics.median(b for _, b in times),
                         "ratios": ratios, "conversion": conversion})
            console.print(f"p={p} {family:5s} speedup {speedup:.2f}x (throughput {throughput:.2f}x), "
                          f"ideal {ideal:.2f}x; standard {rows[-1]['standard_ms']:.0f} ms, "
                          f"fxdrop {rows[-1]['fxdrop_ms']:.0f} ms")
    result = {
        "benchmark": "PTB word LM training step (forward, loss, backward, clip, SGD): standard dropout vs fxdrop",
        "command": "python benchmarks/lstm.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "config": {"hidden": args.hidden, "vocab": args.vocab, "layers": args.layers, "bptt": args.bptt,
                   "batch": args.batch, "dtype": "float32", "pairs": args.pairs, "warmup": args.warmup,
                   "threads": torch.get_num_threads(), "granularity": args.granularity,
                   **({"row_classes": ROW_CLASSES} if args.granularity == "rows" else {})},
        "machine": example.machine(),
        # Other processes on the machine: the paired ratios absorb steady load, not bursts.
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"PTB LM training step, {args.layers}x{args.hidden} LSTM, vocab {args.vocab}, "
                        f"BPTT {args.bptt} x batch {args.batch} (median of {args.pairs} paired ratios)")
    for column in ("p", "family", "standard ms", "fxdrop ms", "speedup", "throughput", "FLOP ideal", "efficiency"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['p']}", r["family"], f"{r['standard_ms']:.0f}", f"{r['fxdrop_ms']:.0f}",
                      f"{r['speedup']:.2f}x", f"{r['throughput_speedup']:.2f}x", f"{r['ideal']:.2f}x",
                      f"{100 * r['efficiency']:.0f}%")
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
