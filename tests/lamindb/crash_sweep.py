"""A randomized crash sweep against a real local LaminDB instance: a kill, then recovery.

Each seed draws a configuration (``save_top_k``, ``save_last`` True or "link",
``every_n_train_steps``, ``async_write``, ``max_workers``, ``max_pending``, the monitored
scores, sometimes ``--keep-files``: a CheckpointIO of the user's that keeps evicted
files, sometimes ``--folder``: a CheckpointIO of the user's that writes each
checkpoint as a folder, as ``torch.distributed.checkpoint`` does, and sometimes
``--late``: that CheckpointIO inside Lightning's ``AsyncCheckpointIO``), a step of a job to die
at and how many times that step is passed first (see ``outbox_train.kill_points``), the
signal (SIGKILL; SIGTERM: Lightning's handling and teardown run; or SIGINT, Ctrl+C:
Lightning's interrupted path, whose flush does not wait, sometimes with a second SIGINT
at the step's next pass or when that flush starts), and how to recover:
``lamin-lightning flush`` on the folder, or the script run again, resumed from
``last.ckpt`` (``ckpt_path="last"``), possibly with another ``async_write`` and
``max_workers``. Half the cases kill the recovery too, at a step of its own drawn the
same way (a rerun SIGKILLs itself, a flush runs in-process under ``flush_killed.py``
with the same hook), then recover once more, cleanly. Folders, ``--late`` and SIGINT are drawn from
a second random stream, so that a seed drawn before they were added still draws the
rest as it did.
The training process (``outbox_train.py``) signals itself at that point, on whichever
thread reaches it; a drawn point it never reaches lets it finish, and the case checks an
uninterrupted run instead.

After the recovery the store must equal the checkpoint folder: one artifact per
checkpoint file (or folder) Lightning left there (a file that does not load, cut short
by the kill in Lightning's own ``torch.save``, or a folder that lacks a file or holds
one that does not load, cut short in the user's CheckpointIO, excepted: ``ModelCheckpoint``
leaves it too, and nothing was journaled for it; a ``last.ckpt`` link, which has none,
as in the reference; and, with ``--keep-files``, a file Lightning evicted that the
user's CheckpointIO kept), its hash the file's (a folder's: lamindb's folder hash and
number of files), none for a file that is gone, and no job pending in the outbox.

Not collected by pytest: run it by hand, one range at a time (each case is two or
three processes, ~25 s)::

    .venv/bin/python tests/lamindb/crash_sweep.py 0 40
    .venv/bin/python tests/lamindb/crash_sweep.py 7 8 --keep   # keep a case's folder
    .venv/bin/python tests/lamindb/crash_sweep.py 1000 1040 --folder   # folders, every seed
    .venv/bin/python tests/lamindb/crash_sweep.py 1040 1080 --signal INT   # Ctrl+C, every seed

Prints each case that fails, how many were killed, and a last line
``done LO-HI: N/M matched``; exits 1 if any failed. Uses its own LaminDB settings,
cache and instance in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "outbox_train.py"
FLUSH_KILLED = HERE / "flush_killed.py"
# Steps of a job a process can die right after (or before: outbox_train.BEFORE).
STEPS = [
    "journaled",
    "journaled_removal",
    "staged",
    "transferred",
    "committed",
    "settled",
    "trashed",
    "moved_aside",
    "replacing",
    "annotated",
    "flagged",
    "removal_deleted",
]


# The seeds whose first run was killed or terminated (the others ran through).
KILLED: list[int] = []
# The seeds that left a checkpoint cut short in the folder (not compared, see run_case).
TORN: list[int] = []


def draw(seed: int, force: dict[str, Any] | None = None) -> dict[str, Any]:
    """The case of one seed: the training script's options, the kill and the recovery.

    ``force``: ``{"folder": True}`` and/or ``{"signal": "INT"}``, whatever the seed draws.
    """
    force = force or {}
    r = random.Random(seed)
    # The edges added later (folders, Ctrl+C) come from a stream of their own, so that each
    # earlier seed still draws the configuration, kill and recovery it drew before.
    edges = random.Random(f"{seed}-edges")
    steps = r.choice([4, 6, 8])
    save_last = r.choice(["true", "true", "link"])
    options = [
        "--steps",
        str(steps),
        "--save-top-k",
        str(r.choice([1, 2, 3, -1])),
        "--save-last",
        save_last,
        "--every",
        str(r.choice([1, 1, 2])),
        "--max-workers",
        str(r.choice([1, 2])),
        "--max-pending",
        str(r.choice([1, 2, 4])),
        "--scores",
        ",".join(str(r.choice([1.0, 2.0, 3.0, 4.0, 5.0])) for _ in range(steps)),
    ]
    if r.random() < 0.5:
        options.append("--async-write")
    keep_files = r.random() < 0.3
    if keep_files:
        options.append("--keep-files")
    steps_drawn = STEPS + (["removal_handed"] if keep_files else [])
    # The rerun may be set up differently (another writer or pool): the outbox is the folder's.
    rerun_options = list(options)
    if r.random() < 0.5:
        if "--async-write" in rerun_options:
            rerun_options.remove("--async-write")
        else:
            rerun_options.append("--async-write")
    rerun_options[rerun_options.index("--max-workers") + 1] = str(r.choice([1, 2, 3]))
    folder = edges.random() < 0.3
    if force.get("folder", folder):
        options.append("--folder")
        rerun_options.append("--folder")
    second = None
    if r.random() < 0.5:  # the recovery killed too, then a last clean one
        second = {
            "kill_at": r.choice(steps_drawn),
            "kill_after": r.choice([1, 1, 2, 3]),
            "recovery": r.choice(["flush", "rerun"]),
        }
    sig = r.choice(["KILL", "KILL", "TERM"])
    ctrl_c = edges.random() < 0.25
    again = edges.choice([None, None, "next", "shutdown"])
    sig = force.get("signal", "INT" if ctrl_c else sig)
    if edges.random() < 0.3:  # Lightning's AsyncCheckpointIO around the CheckpointIO
        options.append("--late")
        rerun_options.append("--late")
    if sig == "INT" and again is not None:  # Ctrl+C pressed twice
        options += ["--again", again]
    return {
        "options": options,
        "rerun_options": rerun_options,
        "steps": steps,
        "signal": sig,
        "kill_at": r.choice(steps_drawn),
        "kill_after": r.choice([1, 1, 2, 3, 5]),
        "recovery": r.choice(["flush", "rerun"]),
        "second_kill": second,
    }


def _train(case_dir: Path, options: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dirpath",
            str(case_dir / "ckpt"),
            "--marker",
            str(case_dir / "marker"),
            "--report",
            str(case_dir / "report.json"),
            *options,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _loads(path: Path) -> bool:
    """Whether the checkpoint file, or folder (``--folder``: every file of
    ``FolderCheckpointIO``'s, and nothing else), at ``path`` is whole."""
    import json

    import torch

    from checkpoint_forms import FOLDER_FILES, FolderCheckpointIO

    try:
        if path.is_dir():
            if sorted(p.name for p in path.iterdir()) != sorted(FOLDER_FILES):
                return False
            json.loads((path / "meta.json").read_text())
            FolderCheckpointIO().load_checkpoint(path)
        else:
            torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return False
    return True


def _flush(case_dir: Path, *kill: str) -> subprocess.CompletedProcess[str]:
    """``lamin-lightning flush`` on the case's folder; with ``kill`` (``--kill-at STEP
    --kill-after N``), run in-process by flush_killed.py with the kill hook installed."""
    command = (
        [sys.executable, str(FLUSH_KILLED), *kill, "--"]
        if kill
        else [
            sys.executable,
            "-m",
            "lamin_lightning._cli",
        ]
    )
    return subprocess.run(
        [*command, "flush", "--no-progress", str(case_dir / "ckpt")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _recover(
    case: dict[str, Any], case_dir: Path, how: str, steps: int, *kill: str
) -> subprocess.CompletedProcess[str]:
    if how == "flush":
        return _flush(case_dir, *kill)
    options = list(case["rerun_options"])
    options[options.index("--steps") + 1] = str(steps)
    return _train(case_dir, options, "--resume", *kill)


def run_case(seed: int, case_dir: Path, force: dict[str, Any] | None = None) -> str | None:
    """Run one seed's case; None if the store ends equal to the folder, else what differs."""
    from lamindb_tier import assert_checkpoint_keys_persisted

    import lamindb as ln
    from lamin_lightning._journal import journal_paths, read_pending
    from lamin_lightning._staging import staging_root

    case = draw(seed, force)
    dirpath = case_dir / "ckpt"
    killed = _train(
        case_dir,
        case["options"],
        "--kill-at",
        case["kill_at"],
        "--kill-after",
        str(case["kill_after"]),
        "--kill-signal",
        case["signal"],
    )
    if killed.returncode == -signal.SIGKILL:
        KILLED.append(seed)
    if case["signal"] in ("TERM", "INT"):
        # SIGTERM: Lightning stops the fit and teardown runs; SIGINT (Ctrl+C): Lightning's
        # interrupted path, on_exception, runs our flush, which does not wait, and exits 1
        # (failures.md, "Ctrl+C and SIGTERM"); how the process then ends is Lightning's
        # affair, not ours: whatever the code, the recovery must complete the set
        # (guarantees.md).
        said = killed.stdout + killed.stderr
        if (
            "Received SIGTERM" in said  # Lightning's log lines
            or "Detected KeyboardInterrupt" in said
            # Raised out of Lightning's handling, or a SIGTERM after training, which the
            # callback holds until its flush is done and then raises again (guarantees.md).
            or killed.returncode in (-signal.SIGINT, -signal.SIGTERM)
        ):
            KILLED.append(seed)
        elif killed.returncode not in (0, -signal.SIGKILL):  # it never got the signal
            return f"the first run ended with {killed.returncode}:\n{killed.stdout}{killed.stderr}"
    elif killed.returncode not in (0, -signal.SIGKILL):
        return f"the first run ended with {killed.returncode}:\n{killed.stdout}{killed.stderr}"
    prefix_file = case_dir / "report.prefix"
    if not prefix_file.exists():
        return None if killed.returncode != 0 else "no key prefix written"
    prefix = prefix_file.read_text()
    if killed.returncode != 0 or case["signal"] in ("TERM", "INT"):
        second = case["second_kill"]
        steps = case["steps"] + 4
        if second is None:
            done = _recover(case, case_dir, case["recovery"], steps)
        else:
            kill = ("--kill-at", second["kill_at"], "--kill-after", str(second["kill_after"]))
            done = _recover(case, case_dir, case["recovery"], steps, *kill)
            if done.returncode == -signal.SIGKILL:
                steps += 4
                done = _recover(case, case_dir, second["recovery"], steps)
        if done.returncode != 0:
            return f"the recovery ended with {done.returncode}:\n{done.stdout}{done.stderr}"
    # A last.ckpt link (save_last="link") gets no artifact of its own (migrating.md).
    checkpoints = [p for p in dirpath.glob("*.ckpt") if not p.is_symlink()]
    on_disk = {f"{prefix}/{p.name}": p for p in checkpoints if _loads(p)}
    # A checkpoint the kill cut short in Lightning's or the user's own save, before
    # Lightning's save returned: nothing was journaled for it, so it has no artifact (a
    # rewrite of last.ckpt cut short gives way to the previous one, with its artifact).
    if len(on_disk) < len(checkpoints):
        TORN.append(seed)
    if "--keep-files" in case["options"]:
        # A user's CheckpointIO that keeps an evicted file keeps only the file: its
        # artifact is deleted all the same, as in a run never interrupted
        # (test_lamindb_outbox.py::test_sigkill_after_a_users_removal_kept_the_file_then_a_
        # flush_deletes_its_artifact). Only once that CheckpointIO was handed the file,
        # though (outbox_train's log): killed between the eviction's journal line and the
        # hand-off, the file and its artifact both stay, as with Lightning's own removal
        # (guarantees.md, "killed between an eviction's line and the move of its file"),
        # so an eviction still pending in the outbox after a kill is no part of this set.
        log = case_dir / "report.removed"
        removed = (
            {f"{prefix}/{name}" for name in log.read_text().split()} if log.exists() else set()
        )
        for key in removed:
            on_disk.pop(key, None)
    pending = [r for p in journal_paths(staging_root(dirpath)) for _, r in read_pending(p)]
    if pending:
        return f"still pending in the outbox: {[(r.op, r.key) for r in pending]}"
    try:
        assert_checkpoint_keys_persisted(ln, prefix, on_disk)
    except AssertionError as error:
        return f"store != folder: {error}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lo", type=int)
    parser.add_argument("hi", type=int)
    parser.add_argument("--keep", action="store_true", help="keep each case's folder")
    parser.add_argument("--folder", action="store_true", help="every case writes folders")
    parser.add_argument("--signal", choices=["KILL", "TERM", "INT"], help="every case's signal")
    args = parser.parse_args()
    force: dict[str, Any] = {}
    if args.folder:
        force["folder"] = True
    if args.signal:
        force["signal"] = args.signal
    root = Path(tempfile.mkdtemp(prefix="crash-sweep-"))
    os.environ["LAMIN_SETTINGS_DIR"] = str(root / "settings")
    os.environ["LAMIN_CACHE_DIR"] = str(root / "cache")
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))  # checkpoint_forms
    from lamin_lightning.testing import local_instance

    failed = 0
    try:
        with local_instance(root / "instance"):
            import lamin_lightning as ll

            ll.save_lightning_features()
            for seed in range(args.lo, args.hi):
                case_dir = root / f"case-{seed}"
                case_dir.mkdir()
                try:
                    problem = run_case(seed, case_dir, force)
                except Exception:
                    problem = traceback.format_exc()
                if problem is not None:
                    failed += 1
                    print(f"seed {seed} {draw(seed, force)}: {problem}", flush=True)
                    print(f"  folder: {case_dir}", flush=True)
                elif not args.keep:
                    shutil.rmtree(case_dir, ignore_errors=True)
    finally:
        if not args.keep and not failed:
            shutil.rmtree(root, ignore_errors=True)
    total = args.hi - args.lo
    print(f"killed {len(KILLED)}/{total} (the others never reached their kill point)")
    print(f"cut short: {TORN} (a checkpoint the kill cut short, left out of the comparison)")
    print(f"done {args.lo}-{args.hi}: {total - failed}/{total} matched", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
