"""Generic fixtures shared by every test module (no LaminDB here)."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TinyModel, loader

# A run started in the background of a non-interactive shell (`cmd &`, nohup, some CI
# runners) inherits SIGINT ignored, and Python leaves it ignored. The Ctrl+C tests press
# Ctrl+C with _thread.interrupt_main() or os.kill(..., SIGINT), which would then do
# nothing: each such test would wait forever for an interrupt that never comes. Python's
# own handler is what an interactive training script has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _quiet_lightning() -> Iterator[None]:
    """Keep Lightning's info banners ("GPU available: ...") out of the test output."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


@pytest.fixture
def tiny_model() -> Callable[..., TinyModel]:
    """Factory of :class:`helpers.TinyModel` (keyword arguments as its constructor)."""
    return TinyModel


@pytest.fixture
def train_loader() -> Callable[..., Any]:
    """Factory of deterministic single-sample dataloaders: ``train_loader(n, width)``."""
    return loader
