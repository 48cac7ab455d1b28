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


def stage_file(path: str | os.PathLike[str], root: Path) -> tuple[Path, int, str]:
    """Give ``path`` a second name under ``root``; return (staged path, size, method).

    The staged file keeps the original base name inside a unique folder, so a
    key derived from the name is the same for the staged file.
    """
    source = Path(path)
    size = source.stat().st_size
    with _counter_lock:
        unique = f"{os.getpid()}-{next(_counter):06d}"
    folder = root / "staged" / unique
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / source.name
    if size >= SMALL_FILE_BYTES and link_is_safe(source.parent):
        try:
            os.link(source, staged)
            return staged, size, "link"
        except OSError:
            pass
    shutil.copyfile(source, staged)
    return staged, size, "copy"


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
