"""Shared helpers of the benchmark scripts (not a benchmark itself: run.py runs ``bench_*.py``).

- :func:`isolate_lamin` / :func:`block_network`: LaminDB state in a folder of the run's
  own, and no connection other than to loopback (LaminDB's hub, AWS) from this process.
- :func:`instrument`: subclass a checkpoint callback to record, per checkpoint, how long
  the training thread stayed inside it beyond Lightning's own local save and removal (the
  *stall*), and the spans of persistence work on the pipeline's threads (for timelines).
- :class:`StepClock`: a Lightning callback recording training-step spans.
- :class:`MotoServer` and :class:`LatencyProxy`: an S3-compatible server on 127.0.0.1 and a
  TCP proxy in front of it that delays every byte by a fixed one-way latency; both run as
  child processes that are stopped by PID.
- :class:`DiskLoad` and :class:`CpuLoad`: a competing process that writes and fsyncs
  64 MiB files in a loop, and one that keeps a core busy; children stopped by PID.
- :func:`run_child`: run a script in a fresh process and read its ``RESULT:`` line.
- :func:`machine`, :func:`write_result`, :func:`print_rows`: the common JSON and table.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
RESULT_PREFIX = "RESULT: "


# -- environment ---------------------------------------------------------------------------


def isolate_lamin(root: Path) -> None:
    """Point LaminDB's settings and cache into ``root`` (before lamindb is imported), and
    work from there: ``lamin init`` writes a ``.lamin/current_instance`` marker into the
    working directory, which must not land in the project."""
    if "lamindb_setup" in sys.modules:
        raise RuntimeError("isolate_lamin() must run before lamindb is imported")
    root.mkdir(parents=True, exist_ok=True)
    os.environ["LAMIN_SETTINGS_DIR"] = str(root / "settings")
    os.environ["LAMIN_CACHE_DIR"] = str(root / "cache")
    os.chdir(root)


class NetworkBlockedError(OSError):
    """A benchmark tried to reach something other than loopback."""


def _check_address(address: Any) -> None:
    if isinstance(address, str | bytes):  # AF_UNIX
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes):
        host = host.decode()
    if host not in LOOPBACK:
        raise NetworkBlockedError(f"benchmarks are offline: connection to {address!r} blocked")


def block_network() -> None:
    """Make every non-loopback connection from this process raise (all threads)."""
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_create_connection = socket.create_connection

    def connect(self: socket.socket, address: Any) -> None:
        _check_address(address)
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_address(address)
        return original_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        _check_address(address)
        return original_create_connection(address, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.create_connection = create_connection


def quiet() -> None:
    """Keep Lightning's and LaminDB's banners and progress out of the benchmark output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "lamindb", "lamindb_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- measuring a checkpoint callback ---------------------------------------------------------


@dataclass
class Span:
    """One piece of work on one thread, in seconds of ``time.perf_counter()``."""

    thread: str
    label: str
    start: float
    end: float


class Recorder:
    """Collects spans from any thread (list.append is atomic)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def add(self, label: str, start: float, end: float, thread: str | None = None) -> None:
        self.spans.append(Span(thread or threading.current_thread().name, label, start, end))

    @contextmanager
    def span(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(label, start, time.perf_counter())


def _timed_call(fn: Callable[..., Any], sink: list[tuple[float, float]]) -> Callable[..., Any]:
    # functools.wraps: the callback takes the timed call for the one it wraps (Lightning's
    # removal stays Lightning's, and the callback's path the one measured).
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append((start, time.perf_counter()))

    return call


def instrument(cls: type, recorder: Recorder | None = None) -> type:
    """Subclass a checkpoint callback to measure what training waits for in it.

    The stall of one checkpoint is the time the training thread spends in
    ``_save_checkpoint`` (and in ``_remove_checkpoint`` for the file it evicts) minus
    Lightning's own local work that every callback shares: ``trainer.save_checkpoint``
    and ``strategy.remove_checkpoint``; plus, for ``lamin_lightning``, its own work around
    Lightning's choice of the checkpoint (``_lightning_save``: failures surfaced, the
    hook's jobs held and released). The same definition as ``lamin_lightning._demo``,
    and, as there, the removal is timed on the instance: a class overriding
    ``_remove_checkpoint`` would be taken for a user's, and take another path.

    With a ``recorder``, spans are recorded for a timeline: on the training thread
    ``local save`` / ``local remove`` and ``in callback`` (the rest of the call); on the
    pipeline's threads, for ``lamin_lightning`` callbacks, ``stage``, ``transfer``,
    ``commit`` and ``remove``.
    """
    from lamin_lightning._demo import timed_around_lightnings_choice

    rec = recorder if recorder is not None else Recorder()
    is_ours = hasattr(cls, "commit_checkpoint_artifact") and hasattr(cls, "_ensure_submitter")

    class Instrumented(cls):  # type: ignore[misc, valid-type]
        def _bench_init(self) -> None:
            if not hasattr(self, "stalls"):
                self.stalls: list[float] = []
                self.local_saves: list[float] = []
                # Lightning's own removal of the file each checkpoint evicts (0: none).
                self.local_removes: list[float] = []
                self.recorder = rec
                self._remove_checkpoint = self._timed_remove  # see above

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            self._bench_init()
            local: list[tuple[float, float]] = []
            trainer.save_checkpoint = _timed_call(trainer.save_checkpoint, local)
            start = time.perf_counter()
            try:
                super()._save_checkpoint(trainer, filepath)
            finally:
                end = time.perf_counter()
                del trainer.save_checkpoint
            local_seconds = sum(e - s for s, e in local)
            self.stalls.append(end - start - local_seconds)
            self.local_saves.append(local_seconds)
            self.local_removes.append(0.0)
            self._bench_spans(start, end, local, "local save")

        def _timed_remove(self, trainer: Any, filepath: str) -> None:
            self._bench_init()
            strategy = trainer.strategy
            local: list[tuple[float, float]] = []
            strategy.remove_checkpoint = _timed_call(strategy.remove_checkpoint, local)
            start = time.perf_counter()
            try:
                super()._remove_checkpoint(trainer, filepath)
            finally:
                end = time.perf_counter()
                del strategy.remove_checkpoint
            removed = sum(e - s for s, e in local)
            if self.stalls:
                self.stalls[-1] += end - start - removed
                self.local_removes[-1] += removed
            self._bench_spans(start, end, local, "local remove")

        def _bench_spans(
            self, start: float, end: float, local: list[tuple[float, float]], label: str
        ) -> None:
            cursor = start
            for s, e in sorted(local):
                if s > cursor:
                    rec.add("in callback", cursor, s)
                rec.add(label, s, e)
                cursor = max(cursor, e)
            if end > cursor:
                rec.add("in callback", cursor, end)

        if hasattr(cls, "_lightning_save"):

            def _lightning_save(self, trainer: Any) -> Any:
                # Our work around Lightning's choice (failures surfaced, jobs held and
                # released) is training-thread time too: added to the checkpoint's stall.
                return timed_around_lightnings_choice(self, super()._lightning_save(trainer))

        if is_ours:

            def save_checkpoint_artifact(self, *args: Any, **kwargs: Any) -> Any:
                with rec.span("transfer"):
                    return super().save_checkpoint_artifact(*args, **kwargs)

            def commit_checkpoint_artifact(self, *args: Any, **kwargs: Any) -> None:
                with rec.span("commit"):
                    super().commit_checkpoint_artifact(*args, **kwargs)

            def remove_checkpoint_artifact(self, *args: Any, **kwargs: Any) -> Any:
                with rec.span("remove"):
                    return super().remove_checkpoint_artifact(*args, **kwargs)

            def _ensure_submitter(self) -> Any:
                # Staging runs on the intake thread: time the preparation each planned
                # staging returns (the Submitter plans it; one wrapper per submitter).
                submitter = super()._ensure_submitter()
                if not getattr(submitter, "_bench_timed", False):
                    plan = submitter.plan_staging

                    def plan_staging(*args: Any, **kwargs: Any) -> Any:
                        staged, prepare = plan(*args, **kwargs)

                        def timed_prepare() -> int:
                            with rec.span("stage"):
                                return prepare()  # type: ignore[no-any-return]

                        return staged, timed_prepare

                    submitter.plan_staging = plan_staging
                    submitter._bench_timed = True
                return submitter

    Instrumented.__name__ = Instrumented.__qualname__ = f"Instrumented{cls.__name__}"
    return Instrumented


def step_clock(recorder: Recorder) -> Any:
    """A Lightning callback that records each training step's span (``step``) and the end
    of the training loop (``train end``, a zero-length span)."""
    import lightning.pytorch as pl

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self._started = 0.0
            self.train_end: float | None = None

        def on_train_batch_start(self, *args: Any) -> None:
            self._started = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            recorder.add("step", self._started, time.perf_counter())

        def on_train_end(self, *args: Any) -> None:
            self.train_end = time.perf_counter()

    return StepClock()


# -- peak memory -----------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since start or since the last :func:`reset_peak_rss` (VmHWM)."""
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current RSS."""
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each live thread of this process, by name.

    Python threads by their name (numbered suffixes kept), others as ``native``.
    """
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    seconds: dict[str, float] = {}
    for info in psutil.Process().threads():
        name = names.get(info.id, "native")
        seconds[name] = seconds.get(name, 0.0) + info.user_time + info.system_time
    return seconds


def thread_group(name: str) -> str:
    """Group thread names for reports: ``lamin-lightning-worker-3`` -> ``worker``."""
    if name.startswith("lamin-lightning-"):
        role = name.removeprefix("lamin-lightning-")
        return "worker" if role.startswith("worker") else role
    if name.startswith("fsspec"):
        return "fsspecIO"
    return name


# -- child processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Stop a child we started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


class MotoServer:
    """``moto_server`` on a free loopback port, stopped by PID on exit."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MotoServer:
        executable = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if executable is None:
            raise RuntimeError(
                "moto_server not found next to this Python; install the bench extra:"
                " .venv/bin/pip install -c constraints.txt -e '.[bench]'"
            )
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [executable, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_for_port(self.port, 30, self.proc)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class LatencyProxy:
    """A TCP proxy on a free loopback port that forwards to ``upstream_port`` and delays
    every chunk, in each direction, by ``one_way_seconds`` (so every request/response
    exchange takes at least twice that: a round trip). Bandwidth is not limited: chunks
    stream back to back, each delivered its latency after it arrived.

    Runs ``_latency_proxy.py`` in a child process (its threads would otherwise compete
    for the benchmark's GIL), stopped by PID on exit.
    """

    def __init__(self, upstream_port: int, one_way_seconds: float, log_path: Path) -> None:
        self.upstream_port = upstream_port
        self.one_way_seconds = one_way_seconds
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LatencyProxy:
        self.port = free_port()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "_latency_proxy.py"),
                    "--listen",
                    str(self.port),
                    "--upstream",
                    str(self.upstream_port),
                    "--delay",
                    str(self.one_way_seconds),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_for_port(self.port, 30, self.proc)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class DiskLoad:
    """A competing writer on the disk: ``_disk_writer.py`` in a child process, writing
    ``size_mib`` MiB files into ``folder`` and fsyncing each, in a loop, until the context
    exits (stopped by PID). Put ``folder`` on the filesystem under test (the checkpoints').

    After exit, :attr:`stats` holds what it did: rounds, bytes, MiB/s, fsync durations.
    """

    def __init__(self, folder: Path, size_mib: int = 64) -> None:
        self.folder = folder
        self.size_mib = size_mib
        self.proc: subprocess.Popen[bytes] | None = None
        self.stats: dict[str, Any] = {}
        self._stats_path = folder / "disk-load-stats.json"

    def __enter__(self) -> DiskLoad:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stats_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_disk_writer.py"),
                "--dir",
                str(self.folder),
                "--size-mib",
                str(self.size_mib),
                "--stats",
                str(self._stats_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        # It finishes its current 4 MiB write, or its fsync, before it exits: allow for a
        # slow disk before SIGKILL.
        stop_process(self.proc, timeout=30)
        self.proc = None
        with suppress(OSError, ValueError):
            self.stats = json.loads(self._stats_path.read_text())
        self._stats_path.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        """Rounds, MiB/s and the median fsync of a 64 MiB file while it ran (for JSON)."""
        fsyncs = self.stats.get("fsync_s") or []
        return {
            "rounds": self.stats.get("rounds", 0),
            "mib_per_s": self.stats.get("mib_per_s", 0.0),
            "fsync_median_s": statistics.median(fsyncs) if fsyncs else None,
            "fsync_max_s": max(fsyncs) if fsyncs else None,
        }


class CpuLoad:
    """One other CPU-bound process (a Python busy loop) for as long as the context lasts;
    stopped by PID on exit."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CpuLoad:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def run_child(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600
) -> dict[str, Any]:
    """Run ``python args...`` in a fresh process; return the JSON of its ``RESULT:`` line."""
    child_env = {**os.environ, **(env or {})}
    # The child must not inherit our LaminDB settings: every child gets its own.
    completed = subprocess.run(
        [sys.executable, *args],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            if completed.returncode:
                break
            return json.loads(line[len(RESULT_PREFIX) :])  # type: ignore[no-any-return]
    tail = (completed.stdout + completed.stderr)[-4000:]
    raise RuntimeError(f"child {' '.join(args)} exited {completed.returncode}:\n{tail}")


def emit_result(result: dict[str, Any]) -> None:
    """A child's answer to :func:`run_child`."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


# -- reporting -------------------------------------------------------------------------------


def _first_line(path: str, prefix: str) -> str:
    with suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return "?"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": _first_line("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(_first_line("/proc/meminfo", "MemTotal").split()[0]) / 2**20, 1)
        if _first_line("/proc/meminfo", "MemTotal") != "?"
        else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1min": os.getloadavg()[0],
    }
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "lightning", "lamindb", "moto"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


@dataclass
class Row:
    """One line of the summary table."""

    scenario: str
    target: str
    measured: str
    passed: bool | None  # None: informational, no target

    @property
    def verdict(self) -> str:
        return "-" if self.passed is None else ("pass" if self.passed else "MISS")


def smoke(rows: Sequence[Row], quick: bool) -> list[Row]:
    """Mark rows of a ``--quick`` run: a smoke test of the script, too short to judge a target."""
    if not quick:
        return list(rows)
    return [Row(f"{r.scenario} [quick]", r.target, r.measured, r.passed) for r in rows]


def print_rows(rows: Sequence[Row]) -> None:
    widths = [
        max(len(h), *(len(getattr(r, f)) for r in rows))
        for h, f in (("scenario", "scenario"), ("target", "target"), ("measured", "measured"))
    ]
    header = (
        f"{'scenario':<{widths[0]}}  {'target':<{widths[1]}}  {'measured':<{widths[2]}}  result"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.scenario:<{widths[0]}}  {r.target:<{widths[1]}}  {r.measured:<{widths[2]}}"
            f"  {r.verdict}"
        )


def write_result(name: str, payload: dict[str, Any], rows: Sequence[Row]) -> Path:
    """Write ``results/{name}.json`` with the machine, the summary rows and ``payload``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "rows": [asdict(r) for r in rows],
        "target_met": all(r.passed for r in rows if r.passed is not None),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=str))
    return path


def spans_as_json(spans: Sequence[Span], origin: float) -> list[dict[str, Any]]:
    """Spans relative to ``origin`` (the start of ``trainer.fit``), for the JSON files."""
    return [
        {
            "thread": s.thread,
            "label": s.label,
            "start": round(s.start - origin, 6),
            "end": round(s.end - origin, 6),
        }
        for s in spans
    ]


def no_read_store(sizes: list[int] | None = None) -> Any:
    """A ``MemoryStore`` whose ``put`` records the file without reading it, so persistence
    costs ~nothing and a benchmark measures the local write alone; each put's file size
    is appended to ``sizes`` if given. Imported lazily: this module stays torch-free."""
    from lamin_lightning.testing import MemoryStore, StoredArtifact

    class NoReadStore(MemoryStore):
        def put(
            self,
            key: str,
            path: str | Path,
            *,
            kind: str = "checkpoint",
            feature_values: dict[Any, Any] | None = None,
        ) -> StoredArtifact:
            size = os.path.getsize(path)
            if sizes is not None:
                sizes.append(size)
            with self._call("put", key), self._lock:
                version = self._versions.get(key, 0) + 1
                self._versions[key] = version
                record = StoredArtifact(key=key, kind=kind, sha256="", size=size, version=version)
                self._objects[key] = record
                return record

    return NoReadStore()
