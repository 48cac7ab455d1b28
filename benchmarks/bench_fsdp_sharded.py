"""FSDP sharded checkpoints (folders of shards) persisted by ``lamin_lightning.Checkpoint``.

Needs a CUDA machine: without one it says so and exits with status 2 (``run.py`` skips it
unless CUDA is available). Runs Lightning's ``FSDPStrategy(state_dict_type="sharded")`` on
every visible GPU (``--devices``) with a stack of linear layers, checkpointing every
``--every`` steps with top-2 and ``last.ckpt``, on an isolated offline local LaminDB
instance. Then checks, on rank zero, that the checkpoint artifacts are exactly
Lightning's kept set: each a folder artifact with every shard file, hashed as its local
folder, with ``is_best_model`` / ``is_last_model`` / ``model_rank`` equal to Lightning's
view. Prints the rows and writes ``results/fsdp_sharded.json``.

Usage: ``python benchmarks/bench_fsdp_sharded.py [--quick] [--devices N] [--width W]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Row, block_network, isolate_lamin, print_rows, quiet, smoke, write_result

ROOT_VARIABLE = "BENCH_FSDP_ROOT"  # set by rank zero; the ranks Lightning relaunches find it


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small steps (smoke test)")
    parser.add_argument("--devices", type=int, default=0, help="GPUs (default: all visible)")
    parser.add_argument("--width", type=int, default=4096, help="width of each linear layer")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, root: Path) -> tuple[Any, Any, Any]:
    """The model, the data and the trainer (every rank builds them the same way)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lamin_lightning as ll

    scores = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0, 0.5, 7.0]

    class Stack(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                *(nn.Linear(args.width, args.width) for _ in range(args.layers))
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            self.log("score", scores[self.global_step % len(scores)], sync_dist=True)
            return self.layers(x).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    generator = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(args.steps * 8, args.width, generator=generator)),
        batch_size=4,
    )
    callback = ll.Checkpoint(
        dirpath=root / "ckpts",
        monitor="score",
        mode="min",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=args.every,
    )
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=args.devices or cuda_devices(),
        strategy=FSDPStrategy(state_dict_type="sharded", auto_wrap_policy={nn.Linear}),
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[callback],
    )
    return Stack(), data, trainer


def check(trainer: Any, callback: Any) -> tuple[list[Row], dict[str, Any]]:
    """Artifacts equal Lightning's kept set by content, flags equal its view (rank zero)."""
    from lamindb_setup.core.hashing import hash_dir

    import lamindb as ln

    def key(path: Any) -> str:
        return str(callback.resolve_artifact_key(trainer, path, "checkpoint"))

    kept = {key(p): Path(p) for p in [*callback.best_k_models, callback.last_model_path]}
    prefix = callback.checkpoint_key_prefix
    artifacts = {a.key: a for a in ln.Artifact.filter(key__startswith=prefix + "/", kind="model")}
    files = {k: sorted(q.name for q in p.rglob("*") if q.is_file()) for k, p in kept.items()}
    same_keys = set(artifacts) == set(kept)
    same_content = same_keys and all(
        artifacts[k].n_files == len(files[k]) and artifacts[k].hash == hash_dir(p)[1]
        for k, p in kept.items()
    )
    flags = {k: _features(ln, a) for k, a in artifacts.items()}
    ranked = sorted(callback.best_k_models.items(), key=lambda item: float(item[1]))
    same_flags = (
        [k for k, f in flags.items() if f.get("is_best_model")] == [key(callback.best_model_path)]
        and [k for k, f in flags.items() if f.get("is_last_model")]
        == [key(callback.last_model_path)]
        and {k: f["model_rank"] for k, f in flags.items() if "model_rank" in f}
        == {key(p): r for r, (p, _) in enumerate(ranked)}
    )
    stats = callback.persistence_stats
    rows = [
        Row("fsdp sharded: artifacts = Lightning's kept set", "equal", str(same_keys), same_keys),
        Row(
            "fsdp sharded: folder artifacts hold every shard",
            "equal",
            str(same_content),
            same_content,
        ),
        Row(
            "fsdp sharded: best/last/rank flags = Lightning's", "equal", str(same_flags), same_flags
        ),
        Row("fsdp sharded: persistence failures", "0", str(stats.failed), stats.failed == 0),
        Row(
            "fsdp sharded: training stall (s, all checkpoints)",
            "(info)",
            f"{stats.training_stall_seconds:.3f}",
            None,
        ),
    ]
    payload = {
        "kept": {k: str(p) for k, p in kept.items()},
        "files": files,
        "artifacts": sorted(artifacts),
        "stats": stats.as_dict(),
    }
    return rows, payload


def _features(ln: Any, artifact: Any) -> dict[str, Any]:
    """Feature values of an artifact, by feature name."""
    rows = ln.models.ArtifactJsonValue.filter(artifact_id=artifact.id).values_list(
        "jsonvalue__feature__name", "jsonvalue__value"
    )
    return dict(rows)


def run(args: argparse.Namespace, root: Path) -> int:
    model, data, trainer = build(args, root)
    callback = trainer.checkpoint_callback
    started = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return 0
    rows, payload = check(trainer, callback)
    rows.append(Row("fsdp sharded: fit seconds", "(info)", f"{seconds:.1f}", None))
    rows = smoke(rows, args.quick)
    print_rows(rows)
    payload["args"] = vars(args)
    write_result("fsdp_sharded", payload, rows)
    return 0 if all(r.passed is not False for r in rows) else 1


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.quick:
        args.width, args.layers, args.steps = 512, 2, 4
    if cuda_devices() == 0:
        print(
            "bench_fsdp_sharded: needs a CUDA machine (torch.cuda found no GPU); FSDP"
            " sharded checkpoints were not exercised. Run it where CUDA is available.",
            file=sys.stderr,
        )
        return 2
    quiet()
    inherited = os.environ.get(ROOT_VARIABLE)
    if inherited:  # a rank Lightning relaunched: the instance exists, rank zero owns it
        os.chdir(inherited)
        block_network()
        return run(args, Path(inherited))
    root = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    os.environ[ROOT_VARIABLE] = str(root)
    isolate_lamin(root)
    block_network()
    import lamin_lightning as ll
    from lamin_lightning.testing import local_instance

    with local_instance(root / "lamin"):
        ll.save_lightning_features()
        return run(args, root)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
