"""The ``lamin-lightning`` command: ``flush DIR``, ``status DIR`` and ``demo``."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any


def _describe(entry: dict[str, Any]) -> str:
    when = entry.get("time")
    stamp = (
        datetime.datetime.fromtimestamp(float(when)).isoformat(timespec="seconds")
        if isinstance(when, int | float)
        else "?"
    )
    return f"{stamp}  {entry.get('op', '?'):6}  {entry.get('kind', '?'):10}  {entry.get('key')}"


def _status(dirpath: Path, as_json: bool) -> int:
    from lamin_lightning._outbox import is_locked
    from lamin_lightning._recovery import outbox_root, pending_entries

    if not dirpath.is_dir():
        print(f"lamin-lightning: {dirpath} is not a directory", file=sys.stderr)
        return 2
    entries = pending_entries(dirpath)
    journals = sorted({path for path, _ in entries})
    in_use = {path: is_locked(path) for path in journals}
    if as_json:
        print(
            json.dumps(
                [
                    {**entry, "journal": str(path), "in_use": in_use[path]}
                    for path, entry in entries
                ],
                indent=2,
                default=str,
            )
        )
        return 0
    if not entries:
        print(f"nothing pending in {outbox_root(dirpath)}")
        return 0
    print(f"{len(entries)} job(s) pending in {outbox_root(dirpath)}:")
    for path, entry in entries:
        busy = "  (held by a running training process)" if in_use[path] else ""
        print(f"  {_describe(entry)}{busy}")
    print(f"run `lamin-lightning flush {dirpath}` to persist them")
    return 0


def _flush(dirpath: Path, timeout: float | None, progress: bool, max_workers: int) -> int:
    from lamin_lightning._recovery import OutboxInUseError, flush_directory

    if not dirpath.is_dir():
        print(f"lamin-lightning: {dirpath} is not a directory", file=sys.stderr)
        return 2
    try:
        report = flush_directory(
            dirpath, timeout=timeout, progress=progress, max_workers=max_workers
        )
    except OutboxInUseError as error:
        print(f"lamin-lightning: {error}", file=sys.stderr)
        return 3
    for event in report.events:
        outcome = type(event).__name__.removeprefix("Artifact").removesuffix("Event").lower()
        detail = ""
        failure = getattr(event, "error", None)
        if failure is not None:
            detail = f"  ({type(failure).__name__}: {failure})"
        print(f"{outcome:8} {event.key}{detail}")
    print(
        f"saved {report.saved}, removed {report.removed}, failed {report.failed};"
        f" {len(report.remaining)} still pending"
    )
    for path in report.busy:
        print(f"skipped {path}: held by a running training process", file=sys.stderr)
    return 1 if report.remaining or report.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lamin-lightning`` console script."""
    parser = argparse.ArgumentParser(
        prog="lamin-lightning", description="Asynchronous LaminDB checkpointing for Lightning."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    flush = commands.add_parser(
        "flush",
        help="persist the checkpoints a crashed or timed-out training run left in DIR's outbox",
        description="Replay the unfinished jobs of DIR's outbox into the connected LaminDB"
        " instance, in their original order and under their original keys. Idempotent.",
    )
    flush.add_argument("dirpath", type=Path, metavar="DIR", help="the checkpoint directory")
    flush.add_argument("--timeout", type=float, default=None, help="give up after SECONDS")
    flush.add_argument("--max-workers", type=int, default=2, help="uploads at once (default 2)")
    flush.add_argument("--no-progress", action="store_true", help="no progress bar")
    status = commands.add_parser("status", help="list the jobs pending in DIR's outbox")
    status.add_argument("dirpath", type=Path, metavar="DIR", help="the checkpoint directory")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser(
        "demo",
        help="train twice, with LaminDB's synchronous callback and with ours, and compare",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from lamin_lightning._demo import main as demo

        return demo(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "status":
        return _status(args.dirpath, args.json)
    if args.command == "flush":
        if args.max_workers < 1:
            parser.error("--max-workers must be at least 1")
        return _flush(args.dirpath, args.timeout, not args.no_progress, args.max_workers)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
