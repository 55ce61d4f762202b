"""The ``fp4jax`` command line: ``report`` (more subcommands live beside it)."""

from __future__ import annotations

import argparse
import sys


def _add_report(sub):
  p = sub.add_parser("report", help="quantization error table (MSE, SQNR) for every format and rule, plus a PNG plot")
  p.add_argument("--out", default="fp4jax_report.png", help="path of the PNG plot (default: %(default)s)")
  p.add_argument("--size", type=int, default=1 << 16, help="elements per synthetic tensor (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=lambda args: __import__("fp4jax.report", fromlist=["main"]).main(args))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="fp4jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  _add_report(sub)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
