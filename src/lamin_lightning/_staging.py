"""Staging: keep the bytes Lightning wrote alive until their upload is done.

Lightning removes evicted checkpoints and rewrites ``last.ckpt`` while their
uploads may still be queued. A staged file is a second name for the same bytes,
inside ``{dirpath}/.lamin-lightning/staged/``, removed once the job finished.

- Same filesystem as the system temp dir: Lightning rewrites a path by renaming
  a temp file onto it (a new inode), so a hard link keeps the old bytes. Link.
- Different filesystems: ``shutil.move`` copies *into* the existing path,
  rewriting the linked inode in place. Copy.
- Small files (configs, ``hparams.yaml``) are copied: loggers rewrite them in place.
- Where linking fails (a filesystem without hard links): copy.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

STAGING_DIRNAME = ".lamin-lightning"
SMALL_FILE_BYTES = 1 << 20

_counter = itertools.count()
_counter_lock = threading.Lock()


def staging_root(dirpath: str | os.PathLike[str]) -> Path:
    """The folder that holds this project's files next to the checkpoints."""
    return Path(dirpath) / STAGING_DIRNAME


def _same_device(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def link_is_safe(dirpath: Path) -> bool:
    """Whether Lightning rewrites files in ``dirpath`` by rename (a hard link survives that)."""
    return _same_device(Path(tempfile.gettempdir()), dirpath)


class Stager:
    """Stages files under one root; remembers per directory whether linking is safe.

    The callback plans a staged name on the training thread (no syscall) and stages
    on the pipeline's intake thread: every syscall releases the GIL, and getting it
    back can take a switch interval (5 ms) while background threads run Python code.
    The training thread waits for a file's staging only before it removes or
    rewrites that file (normally long done).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staged_dir: Path | None = None
        self._trash_dir: Path | None = None
        self._link_safe: dict[Path, bool] = {}

    def plan(self, path: str | os.PathLike[str]) -> Path:
        """Choose the staged name of ``path`` without touching the filesystem."""
        # Unique across processes and restarts (a container's trainer is often PID 1
        # every time): the outbox keeps these names across a crash.
        with _counter_lock:
            unique = f"{os.getpid()}-{next(_counter):06d}-{uuid.uuid4().hex[:12]}"
        return self.root / "staged" / unique / Path(path).name

    def stage(
        self, path: str | os.PathLike[str], staged: Path | None = None
    ) -> tuple[Path, int, str]:
        """Give ``path`` a second name under the root; return (staged path, size, method).

        The staged file keeps the original base name inside a unique folder, so a
        key derived from the name is the same for the staged file.
        """
        source = Path(path)
        staged = staged if staged is not None else self.plan(source)
        size = source.stat().st_size
        if self._staged_dir is None:
            self._staged_dir = self.root / "staged"
            self._staged_dir.mkdir(parents=True, exist_ok=True)
        staged.parent.mkdir()
        if size >= SMALL_FILE_BYTES:
            safe = self._link_safe.get(source.parent)
            if safe is None:
                safe = self._link_safe[source.parent] = link_is_safe(source.parent)
            if safe:
                try:
                    os.link(source, staged)
                    return staged, size, "link"
                except OSError:
                    self._link_safe[source.parent] = False
        shutil.copyfile(source, staged)
        return staged, size, "copy"

    def trash(self, path: str | os.PathLike[str]) -> bool:
        """Move ``path`` out of the checkpoint directory by renaming it; delete it later.

        Freeing the blocks of a large file takes ~100 ms; a rename takes microseconds.
        Used for files Lightning is about to remove or overwrite. Returns False (and
        leaves the file where it is) if ``path`` does not exist or cannot be renamed.
        """
        if self._trash_dir is None:
            self._trash_dir = self.root / "trash"
            try:
                self._trash_dir.mkdir(parents=True, exist_ok=True)
            except OSError:
                return False
        with _counter_lock:
            unique = f"{os.getpid()}-{next(_counter):06d}-{uuid.uuid4().hex[:12]}"
        try:
            os.replace(path, self._trash_dir / f"{unique}-{Path(path).name}")
        except OSError:
            return False
        return True

    def empty_trash(self) -> None:
        """Delete what :meth:`trash` moved aside. Runs off the training thread."""
        folder = self.root / "trash"
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def stage_file(path: str | os.PathLike[str], root: Path) -> tuple[Path, int, str]:
    """Stage one file under ``root`` (see :class:`Stager`)."""
    return Stager(root).stage(path)


def release_staged(staged: Path) -> None:
    """Remove a staged file and its unique folder."""
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


def detach_before_rewrite(path: str | os.PathLike[str]) -> None:
    """Unlink ``path`` if another name (a staged link) shares its inode.

    Lightning then writes a fresh inode instead of possibly rewriting the one a
    queued upload still reads, whatever filesystem the temp dir is on.
    """
    try:
        if os.stat(path).st_nlink > 1:
            os.unlink(path)
    except FileNotFoundError:
        pass
