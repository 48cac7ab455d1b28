"""The LaminDB tier: every test here runs against a real, local, offline SQLite instance.

- LaminDB's settings and cache go to a fresh temporary folder, set at import time
  (before anything imports lamindb: lamindb_setup reads them once, on import).
- One instance per test session (lamindb holds one instance per process), created
  by ``lamin_lightning.testing.local_instance``; tests isolate themselves by distinct
  dirpaths / logger names and by filtering on ``callback.checkpoint_key_prefix``.
- ``save_lightning_features()`` runs once per session, right after the instance exists.
- Non-loopback network is blocked for the whole tier (instance creation included), so
  a call to LaminDB's hub fails loudly instead of stalling or passing by luck.
- Runs: ``ln.track()`` is called once per session with a ``kind="function"``
  Transform. A bare ``ln.track()`` inside pytest records the test module as a
  "script" and then replaces ``sys.stdout``/``sys.stderr`` with its log tracker and
  installs ``sys.excepthook`` and signal handlers, none of which is undone; it also
  runs ``pip freeze`` (~1 s) per call. Tests that need a run of their own (run
  features, run inputs) get one from the ``fresh_run`` fixture: a ``ln.Run`` of the
  session's transform, installed as ``ln.context._run`` (the attribute behind
  ``ln.context.run``) with monkeypatch, so it is restored after the test.

Do not add an ``__init__.py`` here: with one, pytest would import this folder as the
package ``lamindb`` and shadow the real lamindb. Module names are therefore unique
across the tests tree (``test_lamindb_*.py``, ``lamindb_tier.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_LAMIN_HOME = tempfile.mkdtemp(prefix="lamin-lightning-tier-")
_LAMINDB_ALREADY_IMPORTED = "lamindb_setup" in sys.modules
os.environ["LAMIN_SETTINGS_DIR"] = os.path.join(_LAMIN_HOME, "settings")
os.environ["LAMIN_CACHE_DIR"] = os.path.join(_LAMIN_HOME, "cache")

sys.path.insert(0, str(Path(__file__).parent))

from lamindb_tier import block_network  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """Block non-loopback network (all threads) for each module of the tier: its tests and
    module fixtures. The session fixtures block it themselves while they run. Undone after
    each module, so tests outside the tier are unaffected."""
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        yield


@pytest.fixture(scope="session")
def lamin_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's local SQLite instance (created offline); yields its storage folder."""
    if _LAMINDB_ALREADY_IMPORTED:
        pytest.fail(
            "lamindb was imported before tests/lamindb/conftest.py set LAMIN_SETTINGS_DIR;"
            " the tier would use (and pollute) another settings folder"
        )
    from lamin_lightning.testing import local_instance

    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        with local_instance(tmp_path_factory.mktemp("lamin")) as storage:
            yield storage
    shutil.rmtree(_LAMIN_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def ln(lamin_instance: Path) -> Any:
    """lamindb, connected, with the lightning features saved and a session run tracked."""
    import lamin_lightning
    import lamindb

    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        lamin_lightning.save_lightning_features()
        lamindb.track(
            transform=lamindb.Transform(key="lamin-lightning LaminDB tier", kind="function")
        )
    assert lamindb.context.run is not None
    return lamindb


@pytest.fixture
def fresh_run(ln: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A new run of the session's transform, active (``ln.context.run``) for this test only."""
    run = ln.Run(transform=ln.context.transform).save()
    monkeypatch.setattr(ln.context, "_run", run)
    return run


@pytest.fixture
def no_run(ln: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No active LaminDB run during this test."""
    monkeypatch.setattr(ln.context, "_run", None)


@pytest.fixture(scope="session")
def fresh_process_report() -> dict[str, Any]:
    """What ``fresh_process.py`` saw in a process of its own (no instance; then a fresh one)."""
    import json
    import subprocess

    script = Path(__file__).parent / "fresh_process.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMIN_")}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    lines = [
        line.split("RESULT: ", 1)[1] for line in done.stdout.splitlines() if "RESULT: " in line
    ]
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0 and lines, f"fresh_process.py failed ({done.returncode}):\n{output}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]
