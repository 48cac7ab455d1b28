"""Generic test helpers: a tiny LightningModule, dataloaders, trainers and a condition wait.

Nothing here knows about LaminDB; the LaminDB tests can reuse it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lamin_lightning._staging import staging_root
from lamin_lightning.testing import RecordingObserver

T = TypeVar("T")


class TinyModel(pl.LightningModule):
    """A one-layer model whose logged ``score`` follows a given sequence.

    Args:
        width: Input and output width of the linear layer; ``width=512`` makes a
            checkpoint just over 1 MiB (staged by hard link instead of copy).
        scores: ``score`` logged at training step ``i`` is ``scores[i % len(scores)]``.
        fail_at_step: Raise ``RuntimeError(f"boom at step {n}")`` in training step ``n``.
    """

    def __init__(
        self,
        width: int = 4,
        scores: Sequence[float] | None = None,
        fail_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(width, width)
        self.scores = list(scores) if scores is not None else None
        self.fail_at_step = fail_at_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError(f"boom at step {self.fail_at_step}")
        (x,) = batch
        loss = self(x).pow(2).mean()
        if self.scores is not None:
            score = self.scores[self.global_step % len(self.scores)]
            self.log("score", float(score), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self.log("val_loss", self(x).pow(2).mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self.log("test_loss", self(x).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int = 8, width: int = 4) -> DataLoader[Any]:
    """A deterministic dataloader of ``n`` single-sample batches."""
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, width, generator=generator)), batch_size=1)


def make_trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer rooted at ``root``."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_files(dirpath: Path) -> set[str]:
    """Names of the ``.ckpt`` files Lightning left in ``dirpath`` (staging excluded)."""
    return {p.name for p in dirpath.glob("*.ckpt")}


def staged_files(dirpath: Path) -> list[Path]:
    """Files left in the staging area of ``dirpath``."""
    return staged_copies(staging_root(dirpath))


def staged_copies(root: Path) -> list[Path]:
    """Files left in the staged folder of working folder ``root``: copies, and their
    partial files; not the lock files that say which process staged them."""
    folder = root / "staged"
    if not folder.exists():
        return []
    locks = set(folder.glob("*.lock"))
    return sorted(p for p in folder.rglob("*") if p.is_file() and p not in locks)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds; False after ``timeout`` seconds.

    For conditions that have no notification of their own (such as stats
    counters); it waits for a state, never for a fixed time.
    """
    deadline = time.monotonic() + timeout
    idle = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        idle.wait(0.002)
    return True


# -- consistency checks after faults ----------------------------------------------------------


def lightning_kept_paths(callback: Any) -> list[Path]:
    """Lightning's kept set of a ``ModelCheckpoint``: ``best_k_models`` plus ``last_model_path``.

    Without a monitor Lightning tracks no ``best_k_models``: ``best_model_path`` is the
    newest file, and with ``save_top_k=-1`` it keeps every file it wrote (then the
    kept set is every ``*.ckpt`` in ``dirpath``).
    """
    paths = [Path(p) for p in callback.best_k_models]
    if callback.monitor is None:
        if callback.best_model_path:
            paths.append(Path(callback.best_model_path))
        if callback.save_top_k == -1 and callback.dirpath:
            paths.extend(sorted(Path(callback.dirpath).glob("*.ckpt")))
    if callback.last_model_path:
        paths.append(Path(callback.last_model_path))
    return list(dict.fromkeys(paths))


def assert_store_kept_set_persisted(
    store: Any, callback: Any, *, missing: Collection[str] = ()
) -> None:
    """The store-backed twin of ``lamindb_tier.assert_kept_set_persisted``.

    The checkpoints in the :class:`~lamin_lightning.testing.MemoryStore` are exactly
    Lightning's kept set (``best_k_models`` plus ``last_model_path``), keyed by
    ``callback.resolve_artifact_key``, each holding the bytes of the local file when
    that still exists. ``missing``: keys of the kept set known to have failed; they
    must be absent from the store and their local file must be kept.
    """
    trainer = callback._trainer
    expected = {
        callback.resolve_artifact_key(trainer, path, "checkpoint"): path
        for path in lightning_kept_paths(callback)
    }
    unknown = set(missing) - set(expected)
    assert not unknown, f"missing keys {sorted(unknown)} are not in Lightning's kept set"
    stored = store.keys(kind="checkpoint")
    want = set(expected) - set(missing)
    assert stored == want, (
        f"store holds {len(stored)} checkpoint(s), Lightning kept {len(want)};"
        f" extra: {sorted(stored - want)}, absent: {sorted(want - stored)}"
    )
    for key, path in expected.items():
        if key in missing:
            assert path.exists(), f"{path} failed to persist and must be kept locally"
            continue
        record = store.get(key)
        assert record is not None
        if path.exists():
            assert record.sha256 == sha256_file(path), f"{key}: stored bytes differ from {path}"


# -- ordering checks ------------------------------------------------------------------------


def recording_submissions(cls: type[T]) -> type[T]:
    """A subclass of the checkpoint callback ``cls`` that records, on global rank zero,
    ``(operation, key)`` of every checkpoint save and removal Lightning hands it, in
    order, into ``callback.submissions``."""

    class Recording(cls):  # type: ignore[valid-type, misc]
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            if trainer.is_global_zero:
                key = self.resolve_artifact_key(trainer, filepath, "checkpoint")
                self.__dict__.setdefault("submissions", []).append(("save", key))

        def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            super()._remove_checkpoint(trainer, filepath)
            if trainer.is_global_zero:
                key = self.resolve_artifact_key(trainer, filepath, "checkpoint")
                self.__dict__.setdefault("submissions", []).append(("remove", key))

    Recording.__name__ = Recording.__qualname__ = f"Recording{cls.__name__}"
    return Recording  # type: ignore[return-value]


def event_operation(event: Any) -> str:
    """``"save"`` or ``"remove"``: what the job behind ``event`` did (or tried to do)."""
    from lamin_lightning import ArtifactFailedEvent, ArtifactRemovedEvent

    if isinstance(event, ArtifactFailedEvent):
        return event.operation
    return "remove" if isinstance(event, ArtifactRemovedEvent) else "save"


def assert_events_follow_submissions(
    events: Sequence[Any], submissions: Sequence[tuple[str, str]], stats: Any
) -> None:
    """Checkpoint events came in submission order, one per delivered job.

    Every removal is delivered; the only submissions without an event are saves
    that a removal cancelled or a newer save of the same key superseded, and their
    number equals ``stats.cancelled + stats.superseded``.
    """
    delivered = [(event_operation(e), e.key) for e in events if e.kind == "checkpoint"]
    position = 0
    skipped: list[tuple[str, str]] = []
    for index, item in enumerate(delivered):
        while position < len(submissions) and submissions[position] != item:
            skipped.append(submissions[position])
            position += 1
        assert position < len(submissions), (
            f"event {index} {item} is out of submission order (or delivered twice);"
            f" events: {delivered}; submissions: {list(submissions)}"
        )
        position += 1
    skipped.extend(submissions[position:])
    removals = [s for s in submissions if s[0] == "remove"]
    assert [d for d in delivered if d[0] == "remove"] == removals, "a removal was not delivered"
    assert all(op == "save" for op, _ in skipped), skipped
    assert len(skipped) == stats.cancelled + stats.superseded, (
        f"{len(skipped)} saves without an event, but stats count"
        f" {stats.cancelled} cancelled + {stats.superseded} superseded"
    )


class EndTrainingOnceSet(pl.Callback):
    """Training ends only once ``event`` is set (``what`` says what never happened if it
    is not within two minutes); the checkpoint callback's teardown comes after."""

    def __init__(self, event: threading.Event, what: str) -> None:
        self.event = event
        self.what = what

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.event.wait(timeout=120), self.what


class HoldingObserver(RecordingObserver):
    """Holds the first ``kind`` event ("saved" or "removed") until :attr:`gate` is set (a
    notebook's observer waiting on a widget, a lock, a slow service); :attr:`entered` is
    set once it holds it."""

    def __init__(self, kind: str = "saved") -> None:
        super().__init__()
        self.kind = kind
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _hold(self, kind: str) -> None:
        if kind == self.kind and not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(timeout=300), "the test never released the observer"

    def on_artifact_saved(self, event: Any) -> None:
        super().on_artifact_saved(event)
        self._hold("saved")

    def on_artifact_removed(self, event: Any) -> None:
        super().on_artifact_removed(event)
        self._hold("removed")


@contextmanager
def mounted_at(folder: Path, *options: str, lazy_unmount: bool = False) -> Iterator[bool]:
    """``mount *options folder`` (True, unmounted at the end), or False where mounting is
    not permitted (no root, no ``mount``)."""
    import shutil
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if (
        mount is None
        or subprocess.run([mount, *options, str(folder)], capture_output=True).returncode
    ):
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", *(["-l"] if lazy_unmount else []), str(folder)], check=True)


def journal_a_save(
    journal: Path, local: Path, *, store: str, key: str, staged: bool = True
) -> Path:
    """Journal a save of ``local`` in ``journal`` as a callback does (the record first),
    then stage it (unless ``staged`` is False: killed before the staging); close the
    journal; return the staged name. The journal's folder is the working folder."""
    from lamin_lightning._jobs import JobRecord
    from lamin_lightning._journal import Outbox
    from lamin_lightning._staging import Stager

    root = journal.parent
    stager = Stager(root)
    name = stager.plan(local)
    outbox = Outbox(journal)
    outbox.open()
    outbox.append(
        JobRecord(
            op="save",
            kind="checkpoint",
            key=key,
            local_path=str(local),
            staged_path=str(name),
            store=store,
            root=str(root),
        )
    )
    if staged:
        stager.stage(local, name)
    outbox.close()
    return name


def run_ranks(
    command: list[str], root: Path, timeout: float, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    """Run a multi-process (DDP) script ``command`` in ``root``, in a session of its own,
    without a process group's environment inherited from this one; a run that outlives
    ``timeout`` fails the test (a deadlock shows as that)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK"))}
    env.update(PYTHONWARNINGS="ignore", **env_extra)
    try:
        return subprocess.run(
            [sys.executable, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=root,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr
        pytest.fail(f"{command[0]} did not finish within {timeout}s (deadlock?): {stderr!r}")


def ctrl_c_right_after_entering(
    monkeypatch: pytest.MonkeyPatch, condition: threading.Condition, call: Callable[[], Any]
) -> None:
    """Run ``call()`` on this (the main) thread with a Ctrl+C landing right after
    ``threading.Condition.__enter__`` (Python code) took ``condition``'s lock, before the
    ``with`` block that entered it runs; the KeyboardInterrupt, if raised, is swallowed."""
    import contextlib
    import signal

    real = threading.Condition.__enter__

    def enter(self: threading.Condition) -> Any:
        result = real(self)
        if self is condition and threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(threading.Condition, "__enter__", enter)
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            call()
    finally:
        signal.signal(signal.SIGINT, handler)
        monkeypatch.undo()


def returns_on_another_thread(call: Callable[[], Any], timeout: float = 30) -> bool:
    """Whether ``call()`` run on a thread of its own returns within ``timeout`` seconds
    (False: it waits for a lock left taken, say)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()
