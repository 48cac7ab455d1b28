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

Backends: ``LAMIN_LIGHTNING_TIER_BACKEND`` picks the setup the session's instance uses
(one per process, so one per pytest run; ``make test`` runs each):

- ``sqlite`` (default): SQLite database, local storage. Every test of the tier runs.
- ``postgres``: a PostgreSQL server started for the session (``tier_servers.PostgresServer``),
  local storage. ``make test`` runs the ``contract`` tests here.
- ``s3``: SQLite database, artifacts in a bucket of a moto S3 server started for the
  session (``tier_servers.MotoServer``); the instance's default storage is switched to
  the bucket. ``make test`` runs the ``contract`` tests here.

``@pytest.mark.contract`` marks the tests that must hold on every backend (saving, keys,
features, flags and ranks, eviction, overwrite, events). ``@pytest.mark.backend("s3")``
marks a test that needs one backend; under any other it is skipped, with that reason
shown in the summary. A server that cannot start fails the session's tests with its
log, never skips them. Servers run on 127.0.0.1 and are stopped by PID at the end.

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
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

_LAMIN_HOME = tempfile.mkdtemp(prefix="lamin-lightning-tier-")
_LAMINDB_ALREADY_IMPORTED = "lamindb_setup" in sys.modules
os.environ["LAMIN_SETTINGS_DIR"] = os.path.join(_LAMIN_HOME, "settings")
os.environ["LAMIN_CACHE_DIR"] = os.path.join(_LAMIN_HOME, "cache")

sys.path.insert(0, str(Path(__file__).parent))

from lamindb_tier import block_network  # noqa: E402
from tier_servers import MotoServer, PostgresServer, TierSetup, use_s3_storage  # noqa: E402

BACKENDS = ("sqlite", "postgres", "s3")
BACKEND = os.environ.get("LAMIN_LIGHTNING_TIER_BACKEND", "sqlite")
if BACKEND not in BACKENDS:
    raise pytest.UsageError(
        f"LAMIN_LIGHTNING_TIER_BACKEND={BACKEND!r} is not a backend of the LaminDB tier;"
        f" use one of {', '.join(BACKENDS)}"
    )
S3_BUCKET = "lamin-tier"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason shown, tests marked ``backend(name)`` under another backend."""
    for item in items:
        marker = item.get_closest_marker("backend")
        if marker is not None and BACKEND not in marker.args:
            needed = " or ".join(marker.args)
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs LAMIN_LIGHTNING_TIER_BACKEND={needed} (this run: {BACKEND});"
                    " `make test` runs it in that backend's run"
                )
            )


def pytest_report_header(config: pytest.Config) -> str:
    return f"LaminDB tier backend: {BACKEND} (LAMIN_LIGHTNING_TIER_BACKEND)"


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """Block non-loopback network (all threads) for each module of the tier: its tests and
    module fixtures. The session fixtures block it themselves while they run. Undone after
    each module, so tests outside the tier are unaffected."""
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        yield


@pytest.fixture(scope="session")
def tier_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TierSetup]:
    """The session's instance on the backend this run selected (created offline)."""
    if _LAMINDB_ALREADY_IMPORTED:
        pytest.fail(
            "lamindb was imported before tests/lamindb/conftest.py set LAMIN_SETTINGS_DIR;"
            " the tier would use (and pollute) another settings folder"
        )
    from lamin_lightning.testing import local_instance

    root = tmp_path_factory.mktemp("lamin")
    with ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        block_network(mp)
        if BACKEND == "sqlite":
            storage = stack.enter_context(local_instance(root))
            _check_instance(dialect="sqlite", storage=str(storage))
            yield TierSetup(BACKEND, storage, str(storage))
        elif BACKEND == "postgres":
            server = stack.enter_context(PostgresServer())
            storage = stack.enter_context(_postgres_instance(root, server.url))
            _check_instance(dialect="postgresql", storage=str(storage))
            yield TierSetup(BACKEND, storage, str(storage), postgres=server)
        else:
            moto = stack.enter_context(MotoServer(S3_BUCKET))
            # Dummy credentials; the endpoint variable keeps lamindb (botocore) from
            # probing real AWS, which stalls offline.
            for name, value in {
                "AWS_ACCESS_KEY_ID": "lamin-tier",
                "AWS_SECRET_ACCESS_KEY": "lamin-tier",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": moto.url,
            }.items():
                mp.setenv(name, value)
            storage = stack.enter_context(local_instance(root))
            bucket_root = use_s3_storage(f"s3://{S3_BUCKET}/tier", moto.url)
            # Back to the local root storage before disconnecting: with a cloud default
            # storage, lamindb_setup would try to upload the SQLite file to the bucket.
            stack.callback(_set_default_storage, str(storage))
            _check_instance(dialect="sqlite", storage=bucket_root)
            yield TierSetup(BACKEND, storage, bucket_root, moto=moto)
    shutil.rmtree(_LAMIN_HOME, ignore_errors=True)


def _check_instance(*, dialect: str, storage: str) -> None:
    """Fail unless the session's instance really uses ``dialect`` and stores new artifacts
    under ``storage`` (so a misconfigured run cannot pass as another backend's)."""
    import lamindb_setup

    import lamindb

    found = (lamindb_setup.settings.instance.dialect, lamindb.settings.storage.root_as_str)
    assert found[0] == dialect and found[1].rstrip("/") == storage.rstrip("/"), (
        f"the {BACKEND} run's instance is not what it should be: (dialect, default storage)"
        f" = {found}, expected ({dialect!r}, {storage!r})"
    )


def _set_default_storage(root: str) -> None:
    import lamindb

    lamindb.settings.storage = root


@contextmanager
def _postgres_instance(root: Path, db_url: str) -> Iterator[Path]:
    """A LaminDB instance with its database at ``db_url`` and local storage under ``root``."""
    import lamindb_setup

    from lamin_lightning._lamin import ensure_offline_safe

    storage = root / "storage"
    # As local_instance does: lamindb-setup writes a ".lamin/current_instance" marker into
    # the working directory, so init inside ``root``, not in the project (where concurrent
    # sessions would find it); child processes find the instance by LAMIN_CURRENT_INSTANCE.
    previous = os.getcwd()
    os.chdir(root)
    try:
        lamindb_setup.init(storage=str(storage), db=db_url)
    finally:
        os.chdir(previous)
    ensure_offline_safe()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAMIN_CURRENT_INSTANCE", lamindb_setup.settings.instance.slug)
        try:
            yield storage
        finally:
            from django.db import connections

            with suppress(Exception):
                lamindb_setup.disconnect()
            connections.close_all()


@pytest.fixture(scope="session")
def lamin_instance(tier_setup: TierSetup) -> Path:
    """The session's instance; its local storage folder (the instance's root storage)."""
    return tier_setup.local_storage


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
