"""The MNIST MLP training-step benchmark suite: a thin wrapper around ``fxdrop bench`` (see fxdrop/bench.py).

    python benchmarks/run.py [--quick] [--widths 1024,2048,4096] [--rates 0.3,0.5,0.7] [--families row,block]
    python benchmarks/run.py --table benchmarks/results/mlp.json     # the README's markdown table

Writes ``benchmarks/results/mlp.json`` (``mlp_quick.json`` with ``--quick``) and a PNG of speedup against p.
"""

from __future__ import annotations

import argparse
import sys

from fxdrop import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
