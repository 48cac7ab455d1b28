"""The ``lamin-lightning`` console script, run as a user runs it (a subprocess).

- ``status DIR`` reads the outbox without importing torch, Lightning, anyio or lamindb,
  and exits 0 (nothing pending), 1 (jobs pending) or 2 (no outbox, or not a directory).
- ``--version`` prints the package version; every option of every command has a help text.
- ``demo --root DIR`` deletes only what a demo created: it refuses a non-empty folder it
  did not create, and a rerun keeps what someone else put into its folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import lamin_lightning
from lamin_lightning import JobRecord
from lamin_lightning._cli import build_parser
from lamin_lightning._demo import DEMO_ENTRIES, MARKER, ForeignRootError, _claim_root
from lamin_lightning._demo import build_parser as build_demo_parser
from lamin_lightning._journal import Outbox
from lamin_lightning._staging import STAGING_DIRNAME, staging_root

SCRIPT = Path(sys.executable).parent / "lamin-lightning"
# What `status` must not import: each costs seconds (torch, Lightning, lamindb) or is not
# needed to read a journal (anyio, tenacity, tqdm).
HEAVY = ("torch", "lightning", "lamindb", "lamindb_setup", "django", "anyio", "tenacity", "tqdm")
PENDING, NOTHING_PENDING, NO_OUTBOX = 1, 0, 2  # the documented exit codes of `status`


def _command() -> list[str]:
    """The console script pip installed next to this interpreter ([project.scripts])."""
    if SCRIPT.is_file():
        return [str(SCRIPT)]
    return [sys.executable, "-m", "lamin_lightning._cli"]  # pragma: no cover - no script


def lamin_lightning_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _write_outbox(
    dirpath: Path, pending: Sequence[str], settled: Sequence[str] = (), *, keep_open: bool = False
) -> Outbox:
    """A real outbox in ``dirpath``: a journal with ``pending`` and ``settled`` saves, closed
    (a journal left with nothing pending is deleted on close) or held open, as a running
    training process holds it."""
    outbox = Outbox(staging_root(dirpath) / "outbox-cli.jsonl")
    outbox.open()
    for key in [*settled, *pending]:
        record = JobRecord(
            op="save",
            kind="checkpoint",
            key=key,
            local_path=str(dirpath / key.rsplit("/", 1)[-1]),
            store="memory",
            submitted_at=time.time(),
        )
        job_id = outbox.append(record)
        if key in settled:
            outbox.settle(job_id, "saved")
    if not keep_open:
        outbox.close()
    return outbox


def _imported(importtime_log: str) -> set[str]:
    """Top-level modules named in a ``PYTHONPROFILEIMPORTTIME`` log."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in importtime_log.splitlines()
        if line.startswith("import time:") and "|" in line
    }


# -- status ------------------------------------------------------------------------------


def test_status_imports_neither_torch_nor_lightning(tmp_path: Path) -> None:
    """After `status` on a real outbox, no heavy module is in sys.modules (fresh interpreter)."""
    dirpath = tmp_path / "ckpt"
    _write_outbox(dirpath, pending=["run/checkpoints/epoch=0-step=2.ckpt"])
    program = (
        "import json, sys\n"
        "from lamin_lightning._cli import main\n"
        "code = main(['status', sys.argv[1]])\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(dirpath)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"code": PENDING, "heavy": []}


def test_the_status_console_script_imports_nothing_heavy(tmp_path: Path) -> None:
    """The installed script itself (entry point, package, CLI) imports no heavy module."""
    dirpath = tmp_path / "ckpt"
    _write_outbox(dirpath, pending=["run/checkpoints/epoch=0-step=2.ckpt"])
    done = lamin_lightning_cli(
        "status", str(dirpath), env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert done.returncode == PENDING, done.stderr[-2000:]
    imported = _imported(done.stderr)
    assert "lamin_lightning" in imported, "the import-time log was not read"
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


def test_status_exit_codes_on_a_real_outbox(tmp_path: Path) -> None:
    """0 when every job settled, 1 with the pending keys listed, 2 without an outbox."""
    pending = tmp_path / "pending"
    _write_outbox(pending, pending=["run/checkpoints/b.ckpt"], settled=["run/checkpoints/a.ckpt"])
    done = lamin_lightning_cli("status", str(pending))
    assert done.returncode == PENDING, done.stderr
    assert "1 job(s) pending" in done.stdout and "run/checkpoints/b.ckpt" in done.stdout
    assert "run/checkpoints/a.ckpt" not in done.stdout
    assert f"lamin-lightning flush {pending}" in done.stdout
    # The outbox folder itself is accepted too.
    assert lamin_lightning_cli("status", str(staging_root(pending))).returncode == PENDING

    listed = lamin_lightning_cli("status", "--json", str(pending))
    assert listed.returncode == PENDING
    assert [entry["key"] for entry in json.loads(listed.stdout)] == ["run/checkpoints/b.ckpt"]

    # A training process that has persisted everything it saved so far.
    settled = tmp_path / "settled"
    outbox = _write_outbox(settled, pending=[], settled=["run/checkpoints/a.ckpt"], keep_open=True)
    try:
        done = lamin_lightning_cli("status", str(settled))
        listed = lamin_lightning_cli("status", "--json", str(settled))
    finally:
        outbox.close()  # nothing pending: the journal is deleted
    assert (done.returncode, done.stdout.startswith("nothing pending")) == (NOTHING_PENDING, True)
    assert (listed.returncode, json.loads(listed.stdout)) == (NOTHING_PENDING, [])

    # Every job finished and its journal deleted: still nothing pending, not an error.
    done = lamin_lightning_cli("status", str(settled))
    assert (done.returncode, done.stdout.startswith("nothing pending")) == (NOTHING_PENDING, True)

    no_outbox = tmp_path / "no-outbox"
    no_outbox.mkdir()
    done = lamin_lightning_cli("status", str(no_outbox))
    assert done.returncode == NO_OUTBOX
    assert f"no outbox in {no_outbox}" in done.stderr and "nothing pending" not in done.stdout

    a_file = tmp_path / "file.ckpt"
    a_file.write_bytes(b"")
    for not_a_directory in (a_file, tmp_path / "missing"):
        done = lamin_lightning_cli("status", str(not_a_directory))
        assert done.returncode == NO_OUTBOX and "is not a directory" in done.stderr


def test_status_names_an_outbox_a_running_process_holds(tmp_path: Path) -> None:
    """A journal another process holds open is listed as held, and still counts as pending."""
    dirpath = tmp_path / "ckpt"
    outbox = _write_outbox(dirpath, pending=["run/checkpoints/a.ckpt"])
    outbox.open()  # as a training process does, with its flock
    try:
        done = lamin_lightning_cli("status", str(dirpath))
    finally:
        outbox.close()
    assert done.returncode == PENDING
    # Its flock says nothing of which process holds it: a training run, or a flush
    # (a running flush was labelled "a running training process").
    assert "held by another process (a training run or a flush)" in done.stdout


def test_status_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path: Path) -> None:
    """`lamin-lightning status DIR | head -1`: once `head` has its line and exits, status
    ended with a BrokenPipeError traceback; it now ends quietly, with 141 (128 + SIGPIPE)
    as a command a closed pipe ends."""
    dirpath = tmp_path / "ckpt"
    # More output than a pipe holds (64 KiB), so that status writes after head is gone.
    _write_outbox(dirpath, pending=[f"run/checkpoints/{'x' * 400}-{i}.ckpt" for i in range(300)])
    with subprocess.Popen(
        [*_command(), "status", str(dirpath)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as status:
        assert status.stdout is not None and status.stderr is not None
        assert "job(s) pending" in status.stdout.readline()
        status.stdout.close()  # as head does once it has its line
        errors = status.stderr.read()
        code = status.wait(timeout=60)
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors
    assert code == 141


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "-5"),
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "-inf"),
        ("--timeout", "abc"),
        ("--max-workers", "0"),
        ("--max-workers", "-2"),
        ("--max-workers", "two"),
        ("--max-workers", "257"),
    ],
)
def test_flush_refuses_an_option_value_out_of_range_naming_the_option_and_the_fix(
    tmp_path: Path, option: str, value: str
) -> None:
    """`--timeout -5` was taken as 0, `--timeout nan` silently submitted only what fitted
    at once (exit 1, no word of a timeout) and `inf` waited for ever: each now exits 2
    with argparse's error naming the option and what it takes, as `--timeout abc` did."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()  # a directory without an outbox: a value let through exits 0
    # argparse reads a lone "-inf" as an option ("expected one argument"): "=" form only.
    forms = [[f"{option}={value}"]] + ([[option, value]] if value != "-inf" else [])
    for args in forms:
        done = lamin_lightning_cli("flush", "--no-progress", *args, str(dirpath))
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"argument {option}: {value!r}" in done.stderr
        assert (
            "from 1 to 256" in done.stderr
            if option == "--max-workers"
            else "0 or more" in done.stderr
        )
    assert (
        lamin_lightning_cli("flush", "--no-progress", "--timeout", "0", str(dirpath)).returncode
        == 0
    )


# -- version and help --------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    """`lamin-lightning --version` prints `lamin-lightning <lamin_lightning.__version__>`."""
    done = lamin_lightning_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"lamin-lightning {lamin_lightning.__version__}"


def test_python_dash_m_runs_the_same_command(tmp_path: Path) -> None:
    """`python -m lamin_lightning` is the `lamin-lightning` command (where scripts are not
    on PATH): same version line, same exit code for `status` on a real outbox."""
    dirpath = tmp_path / "ckpt"
    _write_outbox(dirpath, pending=["run/checkpoints/epoch=0-step=2.ckpt"])
    version, status = (
        subprocess.run(
            [sys.executable, "-m", "lamin_lightning", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for args in (["--version"], ["status", str(dirpath)])
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"lamin-lightning {lamin_lightning.__version__}"
    assert status.returncode == PENDING, status.stderr
    assert "epoch=0-step=2.ckpt" in status.stdout


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    parser = build_parser()
    yield "lamin-lightning", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"command {choice.dest} has no help text"
            for name, command in action.choices.items():
                if name != "demo":  # demo parses its own options (below)
                    yield f"lamin-lightning {name}", command
    yield "lamin-lightning demo", build_demo_parser()


def test_every_option_has_a_help_text() -> None:
    """Each option and argument of each command says what it does (`--help` shows it)."""
    missing = [
        f"{prog}: {'/'.join(action.option_strings) or action.dest}"
        for prog, parser in _parsers()
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("command", [[], ["status"], ["flush"], ["demo"]])
def test_help_of_each_command_lists_its_options(command: list[str]) -> None:
    """`lamin-lightning [COMMAND] --help` exits 0 and shows every option of the command."""
    parsers = dict(_parsers())
    parser = parsers[" ".join(["lamin-lightning", *command])]
    done = lamin_lightning_cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    for action in parser._actions:
        for option in action.option_strings:
            assert option in done.stdout


# -- demo --------------------------------------------------------------------------------


def test_demo_refuses_a_folder_it_did_not_create(tmp_path: Path) -> None:
    """`demo --root` on a non-empty foreign folder exits 2 naming the folder and the fix,
    and deletes nothing; a file as --root is refused the same way."""
    foreign = tmp_path / "my-project"
    foreign.mkdir()
    (foreign / "runs").mkdir()  # even a name the demo uses
    (foreign / "runs" / "best.ckpt").write_bytes(b"mine")
    (foreign / "notes.txt").write_text("mine")
    done = lamin_lightning_cli("demo", "--root", str(foreign))
    assert done.returncode == 2
    assert str(foreign) in done.stderr and "--root" in done.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "runs"]
    assert (foreign / "runs" / "best.ckpt").read_bytes() == b"mine"

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    done = lamin_lightning_cli("demo", "--root", str(a_file))
    assert done.returncode == 2 and str(a_file) in done.stderr
    assert a_file.read_text() == "mine"


def test_a_demo_folder_is_cleared_of_the_demos_files_only(tmp_path: Path) -> None:
    """A folder the demo marked loses the demo's entries on a rerun and keeps the rest."""
    root = tmp_path / "demo"
    _claim_root(root)  # a new folder: created and marked
    assert (root / MARKER).is_file()
    for name in DEMO_ENTRIES:
        (root / name).mkdir()
        (root / name / "old").write_text("from the last demo")
    (root / "notes.txt").write_text("mine")
    _claim_root(root)
    assert sorted(p.name for p in root.iterdir()) == sorted([MARKER, "notes.txt"])
    assert (root / "notes.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    _claim_root(empty)  # an empty folder loses nothing: it is taken
    assert [p.name for p in empty.iterdir()] == [MARKER]


def test_output_of_a_demo_before_the_marker_is_recognised(tmp_path: Path) -> None:
    """Earlier demos left no marker: their folder (the demo's entries only, with LaminDB
    settings naming its storage) is still the demo's; a lookalike without them is not."""
    root = tmp_path / "demo_output"
    settings = root / "lamin-settings" / ".lamin"
    settings.mkdir(parents=True)
    (settings / "instance--anonymous--storage.env").write_text(
        f"lamin_instance_storage_root={root / 'storage'}\n"
    )
    (root / "runs").mkdir()
    _claim_root(root)
    assert [p.name for p in root.iterdir()] == [MARKER]

    lookalike = tmp_path / "lookalike"
    (lookalike / "runs").mkdir(parents=True)
    (lookalike / "lamin-settings").mkdir()
    with pytest.raises(ForeignRootError, match="not created by the demo"):
        _claim_root(lookalike)
    assert sorted(p.name for p in lookalike.iterdir()) == ["lamin-settings", "runs"]


@pytest.mark.slow
def test_demo_runs_and_a_rerun_keeps_what_it_did_not_create(tmp_path: Path) -> None:
    """The demo (tiny model) trains with both callbacks; a second run in the same folder
    replaces the first run's output and keeps a file someone else put there."""
    root = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMIN_")}
    args = ("demo", "--root", str(root), "--width", "8", "--checkpoints", "2")
    first = lamin_lightning_cli(*args, env=env, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Get the best model back" in first.stdout
    (root / "notes.txt").write_text("mine")
    second = lamin_lightning_cli(*args, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / MARKER).is_file()


def test_flush_or_status_of_a_folder_above_the_checkpoint_folders_names_those_holding_jobs(
    tmp_path: Path,
) -> None:
    """A callback without a dirpath journals in the folder Lightning chose for it,
    ``{save_dir}/{name}/version_N/checkpoints``. ``flush`` given the logger's folder (or
    the project's) has no outbox there: it names each checkpoint folder below that holds
    jobs, with its command, persists nothing and exits 1 (before, it said "0 still
    pending" and exited 0, the jobs untouched); ``status`` names them too."""
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    _write_outbox(folder, ["lightning_logs/version_0/checkpoints/last.ckpt"])
    for given in (tmp_path / "lightning_logs", tmp_path):
        done = lamin_lightning_cli("flush", "--no-progress", str(given))
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"lamin-lightning flush {folder}" in done.stderr
        assert "0 still pending" not in done.stdout
        done = lamin_lightning_cli("status", str(given))
        assert done.returncode == 2
        assert f"lamin-lightning status {folder}" in done.stderr
    listed = lamin_lightning_cli("status", "--json", str(folder))
    assert [job["key"] for job in json.loads(listed.stdout)] == [
        "lightning_logs/version_0/checkpoints/last.ckpt"
    ]


def test_flush_or_status_of_a_folder_above_names_those_journaling_as_earlier_versions_did(
    tmp_path: Path,
) -> None:
    """A checkpoint folder whose journal an earlier version of lamin-lightning wrote inside
    it (``checkpoints/.lamin-lightning``, a layout ``flush`` of the folder still reads),
    below the folder given: the look below matched only ``.NAME.lamin-lightning`` beside a
    checkpoint folder, so ``flush lightning_logs`` said "0 still pending" and exited 0,
    the jobs untouched. It is named, with its command, as one of the current layout."""
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    outbox = Outbox(folder / STAGING_DIRNAME / "outbox-earlier.jsonl")
    outbox.open()
    outbox.append(
        JobRecord(
            op="save",
            kind="checkpoint",
            key="lightning_logs/version_0/checkpoints/last.ckpt",
            local_path=str(folder / "last.ckpt"),
            store="memory",
            submitted_at=time.time(),
        )
    )
    outbox.close()
    for given in (tmp_path / "lightning_logs", tmp_path):
        done = lamin_lightning_cli("flush", "--no-progress", str(given))
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.count(f"lamin-lightning flush {folder}") == 1, done.stderr
        assert "0 still pending" not in done.stdout
        done = lamin_lightning_cli("status", str(given))
        assert f"lamin-lightning status {folder}" in done.stderr, done.stderr
