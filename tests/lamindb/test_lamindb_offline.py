"""Offline: lamin_lightning tells lamindb "not on the hub" only where that is certain, and says so.

lamindb asks LaminHub whether the instance is registered (``InstanceSettings.is_on_hub``)
when it tracks a run or registers a file, and crashes offline. ``save_lightning_features()``
and ``Checkpoint.setup`` record the answer (lamindb's private ``_is_on_hub = False``) for an
instance that cannot be on the hub (owned by ``anonymous``, local storage and database,
nothing from the hub), log it once per process at INFO, and leave every other instance
alone. The tier blocks the network, so a hub call fails these tests loudly.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import fit

import lamin_lightning as ll
from lamin_lightning import _lamin_features

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

SAID = "not on LaminHub"


@pytest.fixture
def unasked(ln: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The instance as a new process sees it: nobody asked the hub, nothing was said yet."""
    import lamindb_setup

    instance = lamindb_setup.settings.instance
    monkeypatch.setattr(instance, "_is_on_hub", None)
    monkeypatch.setattr(_lamin_features, "_told_not_on_hub", False)
    return instance


def _said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lamin_lightning" and SAID in r.getMessage()]


def test_without_the_answer_lamindb_would_ask_the_hub(unasked: Any) -> None:
    """The premise: an instance whose hub state is unknown makes lamindb call the hub."""
    with pytest.raises(OSError, match="blocked"):  # the tier's network guard
        unasked.is_on_hub  # noqa: B018 - the property is the call


def test_a_local_anonymous_instance_is_marked_off_the_hub_and_said_once(
    unasked: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """save_lightning_features() and setup record "not on the hub", so an offline fit
    persists; the INFO line that says so names the instance and comes once per process."""
    caplog.set_level(logging.INFO, logger="lamin_lightning")
    ll.save_lightning_features()
    assert unasked._is_on_hub is False
    said = _said(caplog)
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert unasked.slug in said[0].getMessage()

    unasked._is_on_hub = None  # unknown again: setup must answer it before any upload
    callback = ll.Checkpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    fit(callback, tmp_path, steps=2)
    assert unasked._is_on_hub is False
    assert callback.persistence_stats.saved == 2 and callback.persistence_stats.failed == 0
    assert len(_said(caplog)) == 1, "said once per process, not at every setup"


def _owned_by_an_account(instance: Any, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(instance, "_owner", "someone")


def _registered(instance: Any, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(instance, "_is_on_hub", True)


def _managed_by_the_hub(instance: Any, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(instance, "_api_url", "https://hub.invalid")


def _storage_on_the_hub(instance: Any, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(instance.storage, "_uuid_", uuid.uuid4())


def _remote(instance: Any, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(type(instance), "is_remote", property(lambda self: True))


@pytest.mark.parametrize(
    "on_hub",
    [_registered, _owned_by_an_account, _managed_by_the_hub, _storage_on_the_hub, _remote],
    ids=lambda f: f.__name__.strip("_"),
)
def test_an_instance_that_may_be_on_the_hub_is_left_alone(
    unasked: Any,
    on_hub: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An instance the hub knows, or may know, keeps its hub state: lamindb asks, as always."""
    caplog.set_level(logging.INFO, logger="lamin_lightning")
    on_hub(unasked, monkeypatch)
    before = unasked._is_on_hub
    ll.save_lightning_features()
    assert unasked._is_on_hub is before
    assert _said(caplog) == []
