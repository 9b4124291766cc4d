"""``python -m course_utils <command>``; ``python -m course_utils --help`` lists the commands.

* ``bench`` — the plain torchvision way against the course's fast path (see :mod:`course_utils.bench`).
"""
from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    bench.main(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_arguments

    parser = argparse.ArgumentParser(prog="python -m course_utils", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    bench = commands.add_parser(
        "bench", help="time the plain torchvision pipeline against the course's fast path",
        description="Train and evaluation images/s of the plain torchvision way (PIL transforms in a DataLoader, "
                    "fp32) and of the course's path (TensorLoader + fit), on the same model, batch size and "
                    "images; medians of the repeats, their ratio and peak memory.")
    add_arguments(bench)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
