"""The benchmarks' instrumentation sees our pipeline (``benchmarks/_common.instrument``).

A rename inside the callback once made it treat ours as a foreign callback: no transfer or
commit spans, and ``bench_drain.py`` failed on an empty median. This runs it on a real fit.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers import TinyModel, loader, make_trainer
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import Recorder, instrument


def test_instrument_times_the_stall_and_every_part_of_our_pipeline(tmp_path: Path) -> None:
    recorder = Recorder()
    callback = instrument(MemoryCheckpoint, recorder)(
        MemoryStore(), dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1
    )
    make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(), loader(3))
    assert len(callback.stalls) == 3
    labels = {span.label for span in recorder.spans}
    assert {"local save", "stage", "transfer", "commit", "remove"} <= labels, labels


def test_the_stall_includes_our_work_around_lightnings_choice_of_a_checkpoint(
    tmp_path: Path,
) -> None:
    # Failures surfaced, the hook's jobs held and released: training-thread time of ours
    # outside _save_checkpoint, which the stall must not leave out.
    class SlowAround(MemoryCheckpoint):
        @contextmanager
        def _lightning_save(self, trainer: Any) -> Iterator[None]:
            with super()._lightning_save(trainer):
                yield
            time.sleep(0.05)  # a duration to measure, not a synchronisation

    callback = instrument(SlowAround)(
        MemoryStore(), dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1
    )
    make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(), loader(3))
    assert len(callback.stalls) == 3
    assert min(callback.stalls) >= 0.05, callback.stalls


def test_lightnings_own_removal_is_kept_apart_per_checkpoint_and_ours_leaves_it_nothing(
    tmp_path: Path,
) -> None:
    # The stall leaves Lightning's removal of an evicted file out; `local_removes` keeps
    # it, per checkpoint, for the whole of the hook time besides torch.save. A plain
    # ModelCheckpoint pays its removal on the training thread; ours renames the file and
    # deletes it off the thread, so Lightning's removal finds nothing to do.
    from lightning.pytorch.callbacks import ModelCheckpoint

    # A duration to measure, not a synchronisation: far above any stall of this tiny model
    # on a loaded machine (52 ms once beside another suite, with 0.05 here).
    slow = 0.5
    removals: list[bool] = []  # whether the file was there when Lightning removed it

    def slow_removal(strategy_remove: Any) -> Any:
        # functools.wraps: still Lightning's removal for the callback (a wrapper that says
        # what it wraps); without it, it is a user's, which is handed the file.
        @functools.wraps(strategy_remove)
        def remove(filepath: str) -> None:
            removals.append(Path(filepath).exists())
            time.sleep(slow)
            strategy_remove(filepath)

        return remove

    for cls, args in ((ModelCheckpoint, ()), (MemoryCheckpoint, (MemoryStore(),))):
        removals.clear()
        callback = instrument(cls)(
            *args, dirpath=tmp_path / cls.__name__, every_n_train_steps=1, save_top_k=1
        )
        trainer = make_trainer(tmp_path, [callback], max_steps=3)
        trainer.strategy.checkpoint_io.remove_checkpoint = slow_removal(
            trainer.strategy.checkpoint_io.remove_checkpoint
        )
        trainer.fit(TinyModel(), loader(3))
        assert len(callback.local_removes) == len(callback.stalls) == 3
        assert callback.local_removes[0] == 0.0  # the first evicts nothing
        assert min(callback.local_removes[1:]) >= slow, callback.local_removes
        assert max(callback.stalls) < slow, callback.stalls  # kept out of the stall
        # ModelCheckpoint removes the file itself; ours renamed it out of the way first.
        assert removals == [cls is ModelCheckpoint] * 2, removals
