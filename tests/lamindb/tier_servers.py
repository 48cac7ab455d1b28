"""Real servers for the LaminDB tier: PostgreSQL, an S3-compatible moto server, a latency proxy.

Each server is a child process of the test session, listening on a free port of
127.0.0.1 only, with its data and log under a folder the caller gives (a fresh
temporary folder). Each is a context manager: leaving it (normally or on an error)
stops the process by its PID, first politely, then with SIGKILL. The children also
get a parent-death signal, so a test session killed outright does not leave them
running.

A server that cannot start raises :class:`ServerError` naming what is missing and how
to fix it, with the tail of the server's log: the tier fails loudly, it never skips.

- :class:`PostgresServer`: ``initdb`` + ``postgres`` from ``/usr/lib/postgresql/*/bin``
  (newest version; or the folder in ``$LAMIN_LIGHTNING_PG_BIN``, or ``PATH``). As root
  they run as the ``postgres`` user (``initdb`` refuses root), so the data and socket
  folders are given to that user. A login role with a password and a database it owns
  are created; :attr:`PostgresServer.url` is the ``postgresql://`` URL for ``lamin init``.
- :class:`MotoServer`: ``moto_server -H 127.0.0.1 -p PORT`` from this Python's folder
  (the ``test`` extra installs it), with one bucket created.
- :class:`LatencyProxy`: ``benchmarks/_latency_proxy.py`` in front of another port,
  adding a fixed one-way delay to every chunk in both directions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LATENCY_PROXY_SCRIPT = REPO / "benchmarks" / "_latency_proxy.py"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A test server could not be found, started or prepared."""


def free_port() -> int:
    """A port of 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log: Path, limit: int = 3000) -> str:
    with suppress(OSError):
        return log.read_text(errors="replace")[-limit:]
    return "(no log)"


def _wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[Any], what: str, log: Path
) -> None:
    """Poll ``ready`` until it holds; fail if ``proc`` exits or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"{what} exited with status {proc.returncode} before it was ready;"
                f" its log ({log}):\n{_log_tail(log)}"
            )
        if ready():
            return
        time.sleep(0.05)  # polling a child's readiness, not synchronising test threads
    raise ServerError(
        f"{what} not ready after {START_TIMEOUT:.0f} s; its log ({log}):\n{_log_tail(log)}"
    )


def _port_open(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    return probe


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when the test session dies."""
    libc_name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def _as_user(user: str | None) -> dict[str, Any]:
    """``subprocess`` arguments that run the child as ``user`` (with only its own group)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _start(
    argv: list[str],
    log: Path,
    *,
    death_signal: int = signal.SIGTERM,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    kwargs = _as_user(user)
    with open(log, "ab") as out:
        try:
            return subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(death_signal),
                **kwargs,
            )
        except OSError as error:
            raise ServerError(f"cannot start {argv[0]}: {error}") from error


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Stop a child we started, by its PID: ``sig``, then SIGKILL after STOP_TIMEOUT."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)


def _server_root(prefix: str, owner: str | None) -> Path:
    """A fresh folder under the system temp dir that ``owner`` may enter (pytest's own
    temp folders are private to root)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    if owner is not None:
        shutil.chown(root, owner, owner)
    return root


# -- PostgreSQL ------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """The folder with ``initdb`` and ``postgres``; ServerError with the fix if there is none."""
    override = os.environ.get("LAMIN_LIGHTNING_PG_BIN")
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override))
    else:

        def version(path: Path) -> tuple[int, ...]:
            return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

        candidates.extend(
            sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
        )
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    where = override or "/usr/lib/postgresql/*/bin or PATH"
    raise ServerError(
        f"PostgreSQL server binaries (initdb, postgres) not found in {where};"
        " install them with `apt-get install -y postgresql` (`make test` does this when"
        " pg_ctl is missing) or point LAMIN_LIGHTNING_PG_BIN at their folder"
    )


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a password-protected login role.

    ``fsync`` is off: the cluster lives for one test session and is deleted after it.
    """

    USER = "lamin_tier"
    PASSWORD = "lamin-tier-password"
    DATABASE = "lamin_tier"

    def __init__(self) -> None:
        self.port = 0
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{self.DATABASE}"

    @property
    def log(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def __enter__(self) -> PostgresServer:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        bindir = postgres_bindir()
        # initdb refuses to run as root: as root, run the server as the postgres user.
        user = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError(
                    "running as root, but there is no `postgres` user to run PostgreSQL as"
                    " (initdb refuses root); install the server with"
                    " `apt-get install -y postgresql`, which creates it"
                ) from None
            user = "postgres"
        self.root = _server_root("lamin-lightning-pg-", user)
        data, sockets = self.root / "data", self.root / "socket"
        password_file = self.root / "superuser-password"
        password_file.write_text(self.PASSWORD + "\n")
        data.mkdir(mode=0o700)
        sockets.mkdir(mode=0o700)
        for path in (data, sockets, password_file):
            if user is not None:
                shutil.chown(path, user, user)
        superuser = "postgres"
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                superuser,
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
            **_as_user(user),
        )
        if init.returncode != 0:
            raise ServerError(
                f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}"
            )
        self.port = free_port()
        self.proc = _start(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(sockets),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            self.log,
            death_signal=signal.SIGINT,  # "fast shutdown"
            user=user,
        )
        superuser_url = f"postgresql://{superuser}:{self.PASSWORD}@127.0.0.1:{self.port}/postgres"
        _wait_until(lambda: self._connects(superuser_url), self.proc, "postgres", self.log)
        self._create_role_and_database(superuser_url)

    @staticmethod
    def _connects(url: str) -> bool:
        import psycopg2

        try:
            psycopg2.connect(url, connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def _create_role_and_database(self, superuser_url: str) -> None:
        import psycopg2

        connection = psycopg2.connect(superuser_url)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE ROLE {self.USER} LOGIN PASSWORD %s", (self.PASSWORD,))
                cursor.execute(f"CREATE DATABASE {self.DATABASE} OWNER {self.USER}")
        finally:
            connection.close()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)  # fast shutdown: ends client sessions
            self.proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


# -- S3 (moto) -------------------------------------------------------------------------------


class MotoServer:
    """``moto_server`` on 127.0.0.1 (in-memory S3) with ``bucket`` created."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.port = 0
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        assert self.root is not None
        return self.root / "moto.log"

    def __enter__(self) -> MotoServer:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        executable = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if executable is None:
            raise ServerError(
                f"moto_server not found next to {sys.executable}; install the test extra:"
                " `.venv/bin/python -m pip install -c constraints.txt -e '.[test]'`"
                " (`make install` does)"
            )
        self.root = _server_root("lamin-lightning-moto-", None)
        self.port = free_port()
        self.proc = _start([executable, "-H", "127.0.0.1", "-p", str(self.port)], self.log)
        _wait_until(_port_open(self.port), self.proc, "moto_server", self.log)
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="tier",
            aws_secret_access_key="tier",
        )
        client.create_bucket(Bucket=self.bucket)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port`` that delays every chunk, in
    each direction, by ``one_way_seconds`` (each request/response takes at least twice it).
    Bandwidth is not limited. Runs ``benchmarks/_latency_proxy.py`` in a child process."""

    def __init__(self, upstream_port: int, one_way_seconds: float) -> None:
        self.upstream_port = upstream_port
        self.one_way_seconds = one_way_seconds
        self.port = 0
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LatencyProxy:
        try:
            if not LATENCY_PROXY_SCRIPT.is_file():
                raise ServerError(f"latency proxy script missing: {LATENCY_PROXY_SCRIPT}")
            self.root = _server_root("lamin-lightning-proxy-", None)
            log = self.root / "proxy.log"
            self.port = free_port()
            self.proc = _start(
                [
                    sys.executable,
                    str(LATENCY_PROXY_SCRIPT),
                    "--listen",
                    str(self.port),
                    "--upstream",
                    str(self.upstream_port),
                    "--delay",
                    str(self.one_way_seconds),
                ],
                log,
            )
            _wait_until(_port_open(self.port), self.proc, "latency proxy", log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


# -- what the tier's session runs on ---------------------------------------------------------


@dataclass(frozen=True)
class TierSetup:
    """The session's LaminDB instance: backend name, the instance's local storage folder,
    the default storage of new artifacts (that folder, or ``s3://...?endpoint_url=...``),
    and the servers it uses."""

    backend: str
    local_storage: Path
    artifact_storage: str
    postgres: PostgresServer | None = None
    moto: MotoServer | None = None


def use_s3_storage(root: str, endpoint_url: str) -> str:
    """Register ``root`` (``s3://bucket/prefix``) at ``endpoint_url`` as a storage location
    of the connected instance and make it the default storage of new artifacts (in this
    process); returns the storage root as LaminDB knows it."""
    import lamindb

    storage_root = f"{root}?endpoint_url={endpoint_url}"
    storage: Any = lamindb.Storage(root=storage_root)
    storage.save()
    lamindb.settings.storage = storage_root
    return storage_root
