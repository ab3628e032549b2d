"""Argument parsing, logging and exit codes for the ``dbnode`` command.

Thin by design: each subcommand turns its arguments into engine objects and
calls into ``dbnode``; the engine never reads ``argv``.
"""

import argparse
import sys

import dbnode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbnode",
        description="Downpour SGD on a cluster of plain CPU machines.",
    )
    parser.add_argument("--version", action="version", version=f"dbnode {dbnode.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
