"""The ``lamin-lightning`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lamin-lightning`` console script."""
    parser = argparse.ArgumentParser(
        prog="lamin-lightning", description="Asynchronous LaminDB checkpointing for Lightning."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="train twice, with LaminDB's synchronous callback and with ours, and compare",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from lamin_lightning._demo import main as demo

        return demo(rest)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
