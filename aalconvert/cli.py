"""The ``aalconvert`` command line."""

import argparse
import sys

from aalconvert import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aalconvert",
        description="Convert PyTorch models to train in less memory, and report what is saved.",
    )
    parser.add_argument("--version", action="version", version=f"aalconvert {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
