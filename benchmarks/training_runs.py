"""Training-run speed benchmarks, written to benchmarks/results/ (README's speed tables are rendered from them).

    python benchmarks/training_runs.py mlp       # MNIST MLP, widths 1024-4096, p 0.5/0.7, SGD / momentum / AdamW
    python benchmarks/training_runs.py ptb       # PTB word LM 2 x 650, p 0.5, SGD with clipping, block (forward
                                                 # and rows granularity)
    python benchmarks/training_runs.py check     # rerun each suite's last row; warn if it moved by more than 15%
    python benchmarks/training_runs.py reprice   # recompute the published rows' FLOP and roofline ideals with
                                                 # the current fxdrop.audit (a model change; times untouched)
    python benchmarks/training_runs.py variants --widths 4096 --variant pattern=block,granularity=rows,row_classes=8
    python benchmarks/training_runs.py compile --compile inductor --widths 4096   # torch.compile on both sides
    python benchmarks/training_runs.py compile --compile backend --widths 4096 --merge
    python benchmarks/training_runs.py chain --widths 4096 --variant pattern=row,granularity=forward ...
    python benchmarks/training_runs.py kernels --widths 4096 --kernels composite   # the composite kernels
    python benchmarks/training_runs.py reshuffle --widths 4096 --steps 32 \
        --variant pattern=block,granularity=rows --variant pattern=block,granularity=rows,reshuffle=16

The protocol and every flag are ``fxdrop bench``'s (fxdrop/harness/bench.py); this script only names the
published files: ``training_runs_<suite>.json`` and ``training_runs_check.json``. ``variants`` is the
MLP suite written to ``training_runs_variants.json`` (other fxdrop options against the same standard
model), ``compile`` the MLP suite with ``--compile`` written to ``training_runs_compile.json``, ``chain``
the fused chain op alone (``--suite chain``), ``kernels`` the MLP suite written to
``training_runs_kernels.json`` (run it with ``--kernels composite`` and ``--kernels compiled --merge``: the
same rows on both kernel sets); ``--merge`` replaces only the rows it measures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from fxdrop.harness import bench

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=("mlp", "ptb", "chain", "variants", "compile", "kernels", "reshuffle", "check",
                                             "reprice"))
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    command = "python benchmarks/training_runs.py " + " ".join(argv)
    if args.name == "check":
        files = [RESULTS / "training_runs_mlp.json", RESULTS / "training_runs_ptb.json"]
        return bench.check(files, RESULTS / "training_runs_check.json", Console())
    if args.name == "reprice":
        names = ("mlp", "ptb", "chain", "variants", "compile", "kernels", "reshuffle")
        return bench.reprice([RESULTS / f"training_runs_{name}.json" for name in names], Console())
    args.suite = args.name if args.name in ("ptb", "chain") else "mlp"
    if args.out is None:
        args.out = RESULTS / f"training_runs_{args.name}.json"
    return bench.run(args, command=command)


if __name__ == "__main__":
    sys.exit(main())
