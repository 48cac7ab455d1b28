"""Generic fixtures shared by every test module (no LaminDB here)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TinyModel, loader


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
