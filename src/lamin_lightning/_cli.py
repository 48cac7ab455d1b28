"""The ``lamin-lightning`` command: ``flush DIR``, ``status DIR`` and ``demo``.

``status`` answers in a fraction of a second: this module and the modules ``status``
reads (the records and the journal) import neither torch, Lightning, anyio nor lamindb;
``flush`` and ``demo`` import what they need when they run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_lightning import __version__
from lamin_lightning._jobs import encode

if TYPE_CHECKING:
    from lamin_lightning._jobs import JobRecord


EXIT_OK = 0
EXIT_PENDING = 1
EXIT_USAGE = 2
EXIT_IN_USE = 3
EXIT_UNANNOTATED = 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command a closed pipe ended
EXIT_CODES = """exit codes:
  0  everything persisted (flush) / nothing pending (status)
  1  jobs still pending: failed again, refused, or not reached before --timeout
     (status: or a checkpoint whose rewrite a crash interrupted waits aside; flush: or
     DIR has no outbox and checkpoint folders below it, named, hold jobs)
  2  DIR is not a directory (or, for status, has no working folder: .NAME.lamin-lightning
     beside it, or .lamin-lightning inside it as earlier versions wrote), or an option's
     value is invalid (the message names it)
  3  another process (a training run, another flush) holds the outbox (flush)
  4  every job persisted, but some feature annotations could not be restored (flush)
141  the output's reader stopped reading (a closed pipe: `status DIR | head -1`)"""

# The jobs still pending that `flush` names one per line; the rest are counted.
PENDING_SHOWN = 20
# A journal another process holds: its flock says nothing of which process that is.
HELD = "held by another process (a training run or a flush)"


def _describe(record: JobRecord) -> str:
    try:
        stamp = datetime.datetime.fromtimestamp(record.submitted_at).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):  # none, or a damaged one
        stamp = "?"
    if not record.submitted_at:
        stamp = "?"
    return f"{stamp}  {record.op:6}  {record.kind:10}  {record.key}"


# How deep below a DIR without an outbox to look for checkpoint folders that have one:
# Lightning derives ``{save_dir}/{name}/{version}/checkpoints`` for a callback without a
# dirpath, so a project folder, a logger's folder or a version's folder given for it.
_LOOK_BELOW = 3


def _pending_below(dirpath: Path) -> list[Path]:
    """Checkpoint folders below ``dirpath`` (at most :data:`_LOOK_BELOW` levels) whose
    outbox holds jobs: where ``dirpath`` itself has none, the folders meant."""
    from lamin_lightning._journal import journal_paths, read_pending
    from lamin_lightning._staging import STAGING_DIRNAME, WORKING_SUFFIX, checkpoint_folder_of

    found: dict[Path, None] = {}
    for depth in range(_LOOK_BELOW + 1):
        # The working folder beside a checkpoint folder, and the one inside it that earlier
        # versions wrote (``.*.lamin-lightning`` does not match ``.lamin-lightning``).
        roots = [
            *dirpath.glob("*/" * depth + f".*{WORKING_SUFFIX}"),
            *dirpath.glob("*/" * depth + STAGING_DIRNAME),
        ]
        for root in sorted(roots):
            try:
                pending = root.is_dir() and any(read_pending(j) for j in journal_paths(root))
            except OSError:
                continue
            if pending:
                found[checkpoint_folder_of(root)] = None
    return list(found)


def _say_pending_below(dirpath: Path, command: str) -> bool:
    """Name the checkpoint folders below ``dirpath`` that hold pending jobs, with the
    command for each; whether there are any."""
    below = _pending_below(dirpath)
    if below:
        print(
            f"lamin-lightning: no outbox in {dirpath}, but these checkpoint folders below it"
            " hold unfinished jobs (Lightning's folder for a callback without a dirpath is"
            " {save_dir}/{name}/{version}/checkpoints); run:",
            file=sys.stderr,
        )
        for folder in below:
            print(f"  lamin-lightning {command} {shlex.quote(str(folder))}", file=sys.stderr)
    return bool(below)


def _status(dirpath: Path, as_json: bool) -> int:
    from lamin_lightning._aside import leftovers_in
    from lamin_lightning._journal import is_locked, journal_paths, read_pending, read_unreadable
    from lamin_lightning._staging import working_folders

    # DIR itself may be gone (deleted checkpoints): its working folder beside it is enough.
    roots = [root for root in working_folders(dirpath) if root.is_dir()]
    journals = [path for root in roots for path in journal_paths(root)]
    if not roots:
        if dirpath.is_dir():
            if not _say_pending_below(dirpath, "status"):
                print(f"lamin-lightning: no outbox in {dirpath}", file=sys.stderr)
        else:
            print(f"lamin-lightning: {dirpath} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    root = roots[0]
    # A working folder without journals: every job finished (emptied journals are deleted).
    entries: list[tuple[Path, JobRecord]] = []
    # Pending too, though this version cannot read them (a newer version's, or damaged).
    unreadable: list[tuple[Path, str, str]] = []
    for path in journals:
        try:
            entries += [(path, record) for _, record in read_pending(path)]
            unreadable += [(path, job, why) for job, why in read_unreadable(path)]
        except OSError as error:  # a journal made unreadable, or a folder in its place
            unreadable.append((path, "*", f"the journal cannot be read: {error}"))
    in_use = {path: is_locked(path) for path in journals}
    if as_json:
        print(
            json.dumps(
                [
                    {**_finite(encode(record)), "journal": str(path), "in_use": in_use[path]}
                    for path, record in entries
                ]
                + [
                    {"id": job, "unreadable": why, "journal": str(path), "in_use": in_use[path]}
                    for path, job, why in unreadable
                ],
                indent=2,
                default=str,
            )
        )
        return EXIT_PENDING if entries or unreadable else EXIT_OK
    aside = leftovers_in(dirpath)
    for path in aside:
        print(
            f"{path} is missing or cut short: a crash interrupted its rewrite, and the"
            " previous checkpoint waits aside (the next fit or `lamin-lightning flush`"
            " puts it back)"
        )
    for path, job, why in unreadable:
        print(_unreadable(path, job, why))
    if not entries:
        if not unreadable:
            print(f"no job pending in {root}" if aside else f"nothing pending in {root}")
        return EXIT_PENDING if aside or unreadable else EXIT_OK
    print(f"{len(entries)} job(s) pending in {root}:")
    for path, record in entries:
        busy = f"  ({HELD})" if in_use[path] else ""
        print(f"  {_describe(record)}{busy}")
    print(f"run `lamin-lightning flush {shlex.quote(str(dirpath))}` to persist them")
    return EXIT_PENDING


def _unreadable(path: Path, job: str, why: str) -> str:
    """What a job (or, ``job == "*"``, a whole journal) that cannot be read means."""
    if job == "*":  # the journal itself: not opened or not read (EACCES, EIO)
        return (
            f"{path}: {why}; its jobs stay pending: make it readable and writable (or"
            " repair the disk), then run `lamin-lightning flush` again"
        )
    return (
        f"job {job} in {path} cannot be read by this version ({why}): it stays pending;"
        " a version of lamin-lightning that reads it flushes it"
    )


def _why_dropped(record: JobRecord) -> str:
    if record.never_written():
        if record.cut_short():
            return (
                f"its background write was cut short ({record.local_path} is no whole checkpoint)"
            )
        return "its background write never finished (it failed, or the process ended first)"
    if record.op == "remove" and os.path.lexists(record.local_path):
        return "kept: the process ended before the file left the folder"
    return "a later job of this key replaced it"


def _flush(dirpath: Path, timeout: float | None, progress: bool, max_workers: int) -> int:
    from lamin_lightning._errors import OutboxInUseError
    from lamin_lightning._flush import flush_directory
    from lamin_lightning._staging import working_folders

    if not dirpath.is_dir() and not any(root.is_dir() for root in working_folders(dirpath)):
        print(f"lamin-lightning: {dirpath} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    if not any(root.is_dir() for root in working_folders(dirpath)) and _say_pending_below(
        dirpath, "flush"
    ):
        # A folder above the checkpoint folders (a logger's, a version's): flushing it
        # would find nothing and say "0 still pending" while they hold jobs.
        return EXIT_PENDING
    try:
        report = flush_directory(
            dirpath, timeout=timeout, progress=progress, max_workers=max_workers
        )
    except OutboxInUseError as error:
        print(f"lamin-lightning: {error}", file=sys.stderr)
        return EXIT_IN_USE
    for event in report.events:
        outcome = type(event).__name__.removeprefix("Artifact").removesuffix("Event").lower()
        detail = ""
        failure = getattr(event, "error", None)
        if failure is not None:
            detail = f"  ({type(failure).__name__}: {failure})"
        missing = getattr(event, "unannotated_features", ())
        if missing:
            detail = f"  (not annotated: {', '.join(missing)})"
        print(f"{outcome:8} {event.key}{detail}")
    for record in report.dropped:
        print(f"{'dropped':8} {record.key}  ({_why_dropped(record)})")
    for record, why in report.refused:
        print(f"{'refused':8} {record.key}  ({type(why).__name__}: {why})", file=sys.stderr)
    # Still pending and named on no line above: not reached before --timeout (never
    # submitted, or abandoned in the pipeline when it expired).
    named = {id(record) for record, _ in report.refused}
    failed_keys = {e.key for e in report.events if getattr(e, "error", None) is not None}
    unnamed = [r for r in report.remaining if id(r) not in named and r.key not in failed_keys]
    left = "not persisted before --timeout" if timeout is not None else "not persisted"
    for record in unnamed[:PENDING_SHOWN]:
        print(f"{'pending':8} {record.key}  ({left})")
    if len(unnamed) > PENDING_SHOWN:
        print(
            f"... and {len(unnamed) - PENDING_SHOWN} more pending"
            f" (`lamin-lightning status {shlex.quote(str(dirpath))}` lists them all)"
        )
    print(
        f"saved {report.saved}, removed {report.removed}, failed {report.failed},"
        f" dropped {len(report.dropped)}; {len(report.remaining)} still pending"
    )
    for path in report.busy:
        print(f"skipped {path}: {HELD}", file=sys.stderr)
    for path, job, reason in report.unreadable:
        print(f"{'kept':8} {_unreadable(path, job, reason)}", file=sys.stderr)
    if report.remaining or report.failed or report.unreadable:
        return EXIT_PENDING
    if report.unannotated:
        names = sorted({n for e in report.unannotated for n in e.unannotated_features})
        print(
            f"lamin-lightning: {len(report.unannotated)} checkpoint(s) persisted without the"
            f" feature(s) {', '.join(names)}: they no longer validate in this instance",
            file=sys.stderr,
        )
        return EXIT_UNANNOTATED
    return EXIT_OK


def _seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds: give 0 or more (e.g. --timeout 600),"
            " or leave --timeout out to wait until every job is persisted"
        )
    return value


def _workers(text: str) -> int:
    """``--max-workers``: a whole number from 1 to ``MAX_WORKERS_LIMIT``."""
    from lamin_lightning._options import MAX_WORKERS_LIMIT

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of uploads at once: give a whole number from 1 to"
            f" {MAX_WORKERS_LIMIT} (default 2)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``lamin-lightning`` (``demo``'s own options: ``_demo.build_parser``)."""
    parser = argparse.ArgumentParser(
        prog="lamin-lightning",
        description="Asynchronous LaminDB checkpointing for Lightning.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"lamin-lightning {__version__}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flush = commands.add_parser(
        "flush",
        help="persist the checkpoints a crashed or timed-out training run left in DIR's outbox",
        description="Replay the unfinished jobs of DIR's outbox into the connected LaminDB"
        " instance, in their original order and under their original keys. Idempotent.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flush.add_argument(
        "dirpath",
        type=Path,
        metavar="DIR",
        help="the checkpoint directory (the callback's dirpath)",
    )
    flush.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="give up after SECONDS (0 or more); what is not persisted by then stays pending"
        " (default: wait)",
    )
    flush.add_argument(
        "--max-workers",
        type=_workers,
        default=2,
        metavar="N",
        help="uploads at once (default %(default)s)",
    )
    flush.add_argument(
        "--no-progress", action="store_true", help="no progress bar (for logs and scripts)"
    )
    status = commands.add_parser(
        "status",
        help="list the jobs pending in DIR's outbox",
        description="List the jobs DIR's outbox still holds (checkpoints not yet persisted)."
        " Reads the outbox only: no LaminDB instance needed.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "dirpath",
        type=Path,
        metavar="DIR",
        help="the checkpoint directory (the callback's dirpath)",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the pending jobs as a JSON list (one object per job record)",
    )
    commands.add_parser(
        "demo",
        help="train twice, with LaminDB's synchronous callback and with ours, and compare"
        " (options: `lamin-lightning demo --help`)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lamin-lightning`` console script."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of our output went away (`lamin-lightning status DIR | head -1`):
        # end quietly, as a command killed by SIGPIPE does, not with a traceback. What is
        # left to write goes nowhere (Python's docs, "Note on SIGPIPE").
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # no real stdout (captured)
            pass
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from lamin_lightning._demo import main as demo

        return demo(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "status":
        return _status(args.dirpath, args.json)
    if args.command == "flush":
        return _flush(args.dirpath, args.timeout, not args.no_progress, args.max_workers)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover


def _finite(value: Any) -> Any:
    """``value`` (an encoded record) with every non-finite float as None: JSON has no NaN
    or infinity (Python's ``Infinity`` is refused by strict parsers such as jq), and a
    score that went NaN (Lightning keeps it as infinite) is journaled as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
