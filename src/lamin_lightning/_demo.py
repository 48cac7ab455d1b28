"""The demo: the same training, checkpointed by LaminDB's synchronous callback and by ours.

Run with ``make demo`` (or ``lamin-lightning demo``). Creates a local LaminDB
instance under ``demo_output/`` (fresh each time), trains a small model on CPU
twice with the same data and settings and ~100 MB checkpoints, once with
``lamindb.integrations.lightning.Checkpoint`` and once with
``lamin_lightning.Checkpoint``, and prints what training waited for, the
artifacts and how to get the best model back.

The demo marks the folder it creates; a rerun deletes only what an earlier demo
wrote there, and a non-empty folder the demo did not create is refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = ".lamin-lightning-demo"
# Everything the demo writes under its root (besides MARKER): LaminDB's settings and
# cache, the instance's storage, lamindb-setup's current-instance marker, the checkpoints.
DEMO_ENTRIES = ("lamin-settings", "lamin-cache", "storage", ".lamin", "runs")


class ForeignRootError(Exception):
    """The demo's ``--root`` holds files the demo did not create."""


def _made_by_demo(root: Path, entries: set[str]) -> bool:
    """Whether a demo created ``root``: it carries the marker, or (demos before the marker)
    holds nothing but the demo's entries and LaminDB settings naming ``root/storage``."""
    if (root / MARKER).is_file():
        return True
    settings = root / "lamin-settings"
    if not entries <= set(DEMO_ENTRIES) or not settings.is_dir():
        return False
    storage = str(root / "storage")
    return any(
        path.is_file() and storage in path.read_text(errors="replace")
        for path in settings.rglob("instance--*.env")
    )


def _claim_root(root: Path) -> None:
    """Make ``root`` the demo's folder, emptied of an earlier demo's output.

    Deletes only the entries a demo creates (``DEMO_ENTRIES``), and only in a folder a
    demo created; anything else in it stays. Raises ``ForeignRootError`` for a file or
    a non-empty folder the demo did not create.
    """
    fix = "pass --root a new or empty folder (the demo creates it)"
    if root.exists() and not root.is_dir():
        raise ForeignRootError(f"{root} is not a folder; {fix}")
    if root.is_dir():
        entries = {path.name for path in root.iterdir()}
        if entries and not _made_by_demo(root, entries):
            raise ForeignRootError(
                f"{root} is not empty and was not created by the demo (no {MARKER} file);"
                f" the demo replaces the files it creates there on every run, so it only"
                f" uses its own folder: {fix}"
            )
        for name in DEMO_ENTRIES:
            path = root / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(
        "Created by `lamin-lightning demo`. Each run deletes and recreates "
        + ", ".join(DEMO_ENTRIES)
        + " here, nothing else.\n"
    )


def _prepare_environment(root: Path) -> None:
    if "lamindb_setup" in sys.modules:  # pragma: no cover - only when imported oddly
        raise RuntimeError("run the demo in a fresh process: lamindb is already imported")
    _claim_root(root)
    os.environ["LAMIN_SETTINGS_DIR"] = str(root / "lamin-settings")
    os.environ["LAMIN_CACHE_DIR"] = str(root / "lamin-cache")


@contextmanager
def timed_around_lightnings_choice(callback: Any, inner: Any) -> Iterator[None]:
    """Enter and exit ``inner`` (``lamin_lightning``'s work around Lightning's choice of a
    checkpoint: failures surfaced, the hook's jobs held, then released to the pipeline)
    and add the time to the latest checkpoint's stall in ``callback.stalls``."""
    started = time.perf_counter()
    inner.__enter__()
    ours = time.perf_counter() - started
    try:
        yield
    except BaseException as error:
        if not inner.__exit__(type(error), error, error.__traceback__):
            raise
        return
    started = time.perf_counter()
    inner.__exit__(None, None, None)
    ours += time.perf_counter() - started
    stalls = getattr(callback, "stalls", None)
    if stalls:
        stalls[-1] += ours


def _timed(cls: type) -> type:
    """Subclass a checkpoint callback to measure how long training waits in it.

    The stall of one checkpoint is the time spent in ``_save_checkpoint`` (and in
    ``_remove_checkpoint`` for the file it evicts) minus Lightning's own local work
    that both callbacks share: ``trainer.save_checkpoint`` and the local file removal;
    plus, for ``lamin_lightning``, its work around Lightning's choice of the checkpoint
    (``_lightning_save``; see :func:`timed_around_lightnings_choice`).

    The removal is timed on the instance, not overridden in the class: a class that
    overrides ``_remove_checkpoint`` is taken for a user's, whose evicted files are
    staged before it runs (``_should_remove_checkpoint``), and timing must not change
    the path it times.
    """

    class Timed(cls):  # type: ignore[misc]
        stalls: list[float]
        local_saves: list[float]

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            if not hasattr(self, "stalls"):
                self.stalls, self.local_saves = [], []
            original = trainer.save_checkpoint
            local = [0.0]

            def save(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    local[0] += time.perf_counter() - started

            trainer.save_checkpoint = save
            self._remove_checkpoint = self._timed_remove  # see above
            started = time.perf_counter()
            try:
                super()._save_checkpoint(trainer, filepath)
            finally:
                del trainer.save_checkpoint
            self.stalls.append(time.perf_counter() - started - local[0])
            self.local_saves.append(local[0])

        def _timed_remove(self, trainer: Any, filepath: str) -> None:
            strategy = trainer.strategy
            original = strategy.remove_checkpoint
            local = [0.0]

            def remove(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    local[0] += time.perf_counter() - started

            strategy.remove_checkpoint = remove
            started = time.perf_counter()
            try:
                super()._remove_checkpoint(trainer, filepath)
            finally:
                del strategy.remove_checkpoint
            if getattr(self, "stalls", None):
                self.stalls[-1] += time.perf_counter() - started - local[0]

        if hasattr(cls, "_lightning_save"):

            def _lightning_save(self, trainer: Any) -> Any:
                return timed_around_lightnings_choice(self, super()._lightning_save(trainer))

    Timed.__name__ = f"Timed{cls.__name__}"
    return Timed


def build_parser() -> argparse.ArgumentParser:
    """The options of ``lamin-lightning demo``."""
    parser = argparse.ArgumentParser(
        prog="lamin-lightning demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("demo_output"),
        metavar="DIR",
        help="the demo's folder: LaminDB instance, settings and checkpoints (default"
        " %(default)s); created if absent, an earlier demo's output there is replaced, a"
        " non-empty folder the demo did not create is refused",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=5000,
        help="the model's Linear(width, width) layer; the default %(default)s makes ~100 MB"
        " checkpoints",
    )
    parser.add_argument(
        "--checkpoints",
        type=int,
        default=8,
        help="checkpoints each of the two trainings writes (default %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit code."""
    args = build_parser().parse_args(argv)

    root = args.root.resolve()
    try:
        _prepare_environment(root)
    except ForeignRootError as error:
        print(f"lamin-lightning demo: {error}", file=sys.stderr)
        return 2

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import lamin_lightning as ll
    from lamin_lightning.testing import local_instance

    steps_per_ckpt = 4
    max_steps = steps_per_ckpt * args.checkpoints
    torch.manual_seed(0)
    features = torch.randn(256, args.width)
    targets = torch.randn(256, 1)

    class DemoModel(pl.LightningModule):
        def __init__(self, width: int, lr: float = 1e-3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.body = torch.nn.Linear(width, width)
            self.head = torch.nn.Linear(width, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.head(torch.relu(self.body(x))), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])

    with local_instance(root) as storage:
        from lamindb.integrations import lightning as reference

        import lamindb as ln

        ll.save_lightning_features()
        ln.track()
        results = {}
        callbacks = {}
        for name, cls in (
            ("lamindb (sync)", reference.Checkpoint),
            ("lamin-lightning", ll.Checkpoint),
        ):
            torch.manual_seed(0)
            model = DemoModel(args.width)
            callback = _timed(cls)(
                dirpath=str(root / "runs" / name.split()[0]),
                monitor="train_loss",
                save_top_k=3,
                every_n_train_steps=steps_per_ckpt,
            )
            trainer = pl.Trainer(
                max_steps=max_steps,
                callbacks=[callback],
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            loader = DataLoader(TensorDataset(features, targets), batch_size=32, shuffle=False)
            print(f"training with {name} ...", flush=True)
            started = time.perf_counter()
            trainer.fit(model, loader)
            fit_seconds = time.perf_counter() - started
            results[name] = {
                "fit": fit_seconds,
                "stall": statistics.median(callback.stalls),
                "local": statistics.median(callback.local_saves),
                "count": len(callback.stalls),
            }
            callbacks[name] = callback

        size_mb = Path(callbacks["lamin-lightning"].best_model_path).stat().st_size / 1e6
        print()
        print(
            f"Same data, same settings, {results['lamin-lightning']['count']} checkpoints of"
            f" {size_mb:.0f} MB, CPU, local SQLite instance at {storage}"
        )
        print()
        header = f"{'callback':<18}{'fit time':>10}{'torch.save':>14}{'stall/ckpt':>14}"
        print(header)
        print("-" * len(header))
        for name, row in results.items():
            print(
                f"{name:<18}{row['fit']:>9.2f}s{row['local'] * 1e3:>12.0f}ms"
                f"{row['stall'] * 1e3:>12.1f}ms"
            )
        sync, ours = results["lamindb (sync)"], results["lamin-lightning"]
        print()
        print(
            f"Training waited {sync['stall'] / max(ours['stall'], 1e-9):,.0f}x less per checkpoint"
            f" (median stall beyond Lightning's own local write and removal:"
            f" {sync['stall'] * 1e3:.0f} ms -> "
            f"{ours['stall'] * 1e3:.1f} ms); fit time {ours['fit'] / sync['fit']:.2f}x."
        )
        ours_cb = callbacks["lamin-lightning"]
        stats = ours_cb.persistence_stats
        print(
            f"lamin-lightning persisted {stats.saved} files, removed {stats.removed} evicted,"
            f" {stats.failed} failed, {stats.retried} retries,"
            f" mean latency {stats.mean_persistence_latency_seconds:.2f}s;"
            f" {stats.admission_waits} checkpoints waited for a free slot"
            f" ({stats.training_stall_seconds:.2f}s in all)."
        )
        print()
        prefix = ours_cb.checkpoint_key_prefix
        print(f"Artifacts under {prefix}/:")
        for artifact in ln.Artifact.filter(key__startswith=prefix + "/").order_by("key"):
            values = artifact.features.get_values()
            shown = {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in values.items()
                if k in ("is_best_model", "is_last_model", "model_rank", "score")
            }
            print(f"  {artifact.key.removeprefix(prefix + '/'):<28} {shown}")
        print()
        print("Get the best model back:")
        print('  is_best = ln.Feature.filter(name="is_best_model").one()')
        print(
            f"  best = ln.Artifact.filter(is_best == True, key__startswith={prefix + '/'!r}).one()"
        )
        print("  trainer.fit(model, ckpt_path=best.cache())")
        is_best = ln.Feature.filter(name="is_best_model").one()
        best = ln.Artifact.filter(is_best == True, key__startswith=prefix + "/").one()  # noqa: E712
        print(f"  -> {best.key} (score {best.features.get_values().get('score')})")
        if not best.key.endswith(Path(ours_cb.best_model_path).name):
            print("error: the best artifact does not match Lightning's best_model_path")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
