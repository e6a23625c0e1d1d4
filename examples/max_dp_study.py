"""How the support of P(dp) (``max_dp``) and the scale mode change accuracy, at equal expected work.

Every distribution with drop rate p keeps 1 - p of the units in expectation, so ``max_dp`` does not
change the expected speedup; it changes how far single steps stray from 1 - p (a step with dp = 8
keeps 1/8 of a layer). This trains the demo's MLP with standard dropout and with fxdrop variants
``family/scale/max_dp`` side by side (same weights, same data order; fxdrop.harness.demo's engine) and
writes the test accuracy after every epoch.

    python examples/max_dp_study.py --p 0.5 --variants block/kept/8,block/kept/2,block/rate/3
    python examples/max_dp_study.py --p 0.7 --width 512 --epochs 6 --variants block/kept/4,block/kept/8

Writes ``examples/results/max_dp_study/p<p>_w<width>_e<epochs>_s<seed>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import fxdrop
from fxdrop.harness.audit_cli import max_dp_arg
from fxdrop.harness.data import load_mnist
from fxdrop.harness.demo import DemoConfig, train_interleaved
from fxdrop.harness.models import mnist_mlp
from fxdrop.harness.timing import machine_info

OUT = Path(__file__).resolve().parent / "results" / "max_dp_study"


def parse_variant(text: str) -> tuple[str, str, int | str]:
    """``"block/kept/8"`` -> ``("block", "kept", 8)``."""
    try:
        family, scale, max_dp = text.split("/")
        return family, scale, max_dp_arg(max_dp)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected family/scale/max_dp ({error})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--variants", default="block/kept/8,block/kept/auto",
                        help="comma-separated family/scale/max_dp (default block/kept/8,block/kept/auto)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default under {OUT})")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants.split(",")]
    config = DemoConfig(width=args.width, epochs=args.epochs, p=args.p, seed=args.seed)
    torch.manual_seed(args.seed)
    standard = mnist_mlp(args.width, args.p)
    models = {"standard": standard}
    for family, scale, max_dp in variants:
        models[f"{family}/{scale}/{max_dp}"] = fxdrop.convert(copy.deepcopy(standard), p=args.p, pattern=family,
                                                             seed=args.seed, scale=scale, max_dp=max_dp)
    records = train_interleaved(models, config, load_mnist())
    result = {"command": "python examples/max_dp_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {"p": args.p, "width": args.width, "epochs": args.epochs, "seed": args.seed,
                         "batch": config.batch, "lr": config.lr, "momentum": config.momentum},
              "machine": machine_info(),
              "test_accuracy": {r.name: [round(100 * a, 2) for a in r.test_accuracy] for r in records},
              "epoch_seconds": {r.name: r.epoch_seconds for r in records}}
    out = args.out or OUT / f"p{args.p}_w{args.width}_e{args.epochs}_s{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, accuracy in result["test_accuracy"].items():
        print(f"{name:20s} final {accuracy[-1]:.2f}%  per epoch {accuracy}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
