"""The benchmarks' instrumentation sees our pipeline (``benchmarks/_common.instrument``).

A rename inside the callback once made it treat ours as a foreign callback: no transfer or
commit spans, and ``bench_drain.py`` failed on an empty median. This runs it on a real fit.
"""

from __future__ import annotations

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
