"""Differential harness: the same tiny fit with Lightning's ``ModelCheckpoint`` and with ours.

Each case runs one seeded CPU fit (optionally a second, resumed fit) twice, in separate
folders: once with ``lightning.pytorch.callbacks.ModelCheckpoint(**opts)``, once with our
callback and the same ``**opts`` (plus our knobs ``async_write``, ``outbox``,
``max_workers``). After ``fit`` returns it compares: the folder listing (names, symlink
or file, link target name), ``best_model_path``, ``best_model_score``, ``best_k_models``
(base name -> score), ``kth_best_model_path``, ``kth_value``, ``last_model_path``,
``current_score``, ``state_dict()`` (paths relative), every kept checkpoint loaded with
``torch.load`` (top-level keys, epoch, step, weights, callback states, loop state), the
error ``fit`` raised if any, and for ours that the store holds exactly the kept regular
``.ckpt`` files, with their current bytes (no evicted or replaced file left behind).

Most cases use ``MemoryCheckpoint`` (no database); ``test_lamindb_*`` run the real
``lamin_lightning.Checkpoint`` on an offline local LaminDB instance (network blocked).

Documented differences that are filtered out (docs/migrating.md): dangling ``last`` links
Lightning leaves behind ("No dangling last link"); MemoryCheckpoint keys by base name, so
store checks are skipped for file names with a "/" (the real Checkpoint keys by path).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

NAN = float("nan")


class SeqModel(pl.LightningModule):
    """Logs ``train_loss`` = train_seq[global_step] and ``val_loss`` = val_seq[val call]."""

    def __init__(
        self,
        train_seq: list[float],
        val_seq: list[float],
        fail_at: int | None = None,
        width: int = 0,
    ) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.layer = nn.Linear(3, 3)
        if width:
            self.big = nn.Linear(width, width)
        self.train_seq = train_seq
        self.val_seq = val_seq

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError(f"boom at step {self.fail_at}")
        (x,) = batch
        loss = self.layer(x).pow(2).mean()
        value = self.train_seq[self.global_step % len(self.train_seq)]
        self.log("train_loss", float(value), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        value = self.val_seq[self.current_epoch % len(self.val_seq)]
        self.log("val_loss", float(value))
        self.log("val/loss", float(value))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n: int) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g)), batch_size=1)


TRAIN_KEYS = (
    "max_epochs",
    "max_steps",
    "check_val_every_n_epoch",
    "limit_val_batches",
    "val_check_interval",
    "accumulate_grad_batches",
)


# Links Lightning's arm was to remove while they dangled: its removal leaves them (see
# observe), and a later save under the target's name makes them name a checkpoint again.
_LEFT_DANGLING: set[str] = set()


def run_fit(
    kind: str,
    root: Path,
    opts: dict[str, Any],
    train: dict[str, Any],
    knobs: dict[str, Any] | None = None,
    preexisting: list[str] = (),
    resume: dict[str, Any] | None = None,
    last_name: str | None = None,
) -> dict[str, Any]:
    """One fit (and optionally a resumed second fit) in ``root``; returns the observations."""
    root.mkdir(parents=True, exist_ok=True)
    no_dirpath = train.get("no_dirpath", False)  # Lightning's default: root/checkpoints
    dirpath = root / ("checkpoints" if no_dirpath else "ckpts")
    dirpath.mkdir(exist_ok=True)
    for name in preexisting:
        (dirpath / name).write_bytes(b"junk")
    store = MemoryStore() if kind == "ours" else None
    _LEFT_DANGLING.clear()

    def make_callback(
        kind: str = kind, extra_opts: dict[str, Any] | None = None
    ) -> ModelCheckpoint:
        callback = _make_callback(kind, opts if extra_opts is None else extra_opts)
        if last_name:
            callback.CHECKPOINT_NAME_LAST = last_name
        return callback

    def _make_callback(kind: str, opts: dict[str, Any]) -> ModelCheckpoint:
        if kind == "lightning":
            callback = ModelCheckpoint(dirpath=None if no_dirpath else dirpath, **opts)
            remove = callback._remove_checkpoint

            def noting_dangling_links(trainer: pl.Trainer, filepath: str) -> None:
                if os.path.islink(filepath) and not os.path.exists(filepath):
                    _LEFT_DANGLING.add(os.path.abspath(filepath))  # removal does nothing
                remove(trainer, filepath)

            link = callback._link_checkpoint

            def linking_again(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
                _LEFT_DANGLING.discard(os.path.abspath(linkpath))  # made anew: Lightning's own
                link(trainer, filepath, linkpath)

            callback._remove_checkpoint = noting_dangling_links  # type: ignore[method-assign]
            callback._link_checkpoint = linking_again  # type: ignore[method-assign]
            return callback
        if kind == "ours":
            return MemoryCheckpoint(
                store, dirpath=None if no_dirpath else dirpath, **opts, **(knobs or {})
            )
        if kind == "lamin":
            import lamin_lightning as ll

            return ll.Checkpoint(
                dirpath=None if no_dirpath else str(dirpath), **opts, **(knobs or {})
            )
        raise ValueError(kind)

    def fit(train_opts: dict[str, Any], ckpt_path: str | None, this_kind: str) -> ModelCheckpoint:
        pl.seed_everything(train_opts.get("seed", 0), verbose=False)
        model = SeqModel(
            train_opts["train_seq"],
            train_opts["val_seq"],
            train_opts.get("fail_at"),
            train_opts.get("width", 0),
        )
        callback = holder["callback"] = make_callback(this_kind)
        extra = [make_callback(this_kind, o) for o in train_opts.get("extra_callbacks", [])]
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=str(root),
            callbacks=[callback, *extra],
            deterministic=True,
            **{k: train_opts[k] for k in TRAIN_KEYS if k in train_opts},
        )
        n = train_opts.get("n_batches", 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, loader(n), loader(2), ckpt_path=ckpt_path)
        return callback

    holder: dict[str, Any] = {}
    try:
        first_kind = (resume or {}).get("first_kind", kind) if kind != "lightning" else kind
        callback = fit(train, None, first_kind)
    except Exception as e:
        if "callback" not in holder:
            return {"first": {"error": error_text(e, root)}}
        return {
            "first": {
                "error": error_text(e, root),
                **observe(holder["callback"], root, dirpath, store, preexisting),
            }
        }
    observed = {"first": observe(callback, root, dirpath, store, preexisting)}
    if resume is not None:
        which = resume["ckpt"]
        if which == "last":
            ckpt_path = "last" if callback.last_model_path else None
            if ckpt_path is None:
                observed["resume"] = "no last"
                return observed
            ckpt_path = callback.last_model_path
        else:
            ckpt_path = callback.best_model_path
            if not ckpt_path:
                observed["resume"] = "no best"
                return observed
        t2 = {**train, **resume["train"]}
        try:
            callback2 = fit(t2, ckpt_path, kind)
        except Exception as e:
            observed["resume"] = {"error": error_text(e, root)}
            return observed
        observed["resume"] = observe(callback2, root, dirpath, store, preexisting)
        observed["resumed_from"] = os.path.relpath(ckpt_path, root)
    return observed


def error_text(e: BaseException, root: Path | None = None) -> str:
    text = f"{type(e).__name__}: {e}"
    if root is not None:  # each side's folder: paths in messages compare
        text = text.replace(str(root), "<root>")
    for name in ("MemoryCheckpoint", "Checkpoint"):
        text = text.replace(f"`{name}`", "`ModelCheckpoint`")
    return text[:300]


def rel(value: Any, root: Path) -> Any:
    if isinstance(value, (str, Path)) and str(value).startswith(str(root)):
        return os.path.relpath(str(value), str(root))
    if isinstance(value, dict):
        return {rel(k, root): rel(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rel(v, root) for v in value)
    return value


def num(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else round(value, 6)
    return value


def norm_state(state: dict[str, Any], root: Path) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if k == "best_k_models":
            v = {rel(p, root): num(s) for p, s in v.items()}
        else:
            v = num(rel(v, root))
        out[k] = v
    return out


def callback_states(ckpt: dict[str, Any], root: Path) -> dict[str, Any]:
    """The checkpoint callbacks' states, keyed with the class name stripped."""
    out = {}
    for key, value in ckpt.get("callbacks", {}).items():
        name = key.split("{", 1)
        out["CB{" + (name[1] if len(name) > 1 else "")] = norm_state(value, root)
    return out


def observe(
    callback: ModelCheckpoint,
    root: Path,
    dirpath: Path,
    store: MemoryStore | None,
    preexisting: list[str],
) -> dict[str, Any]:
    listing = {}
    loaded = {}
    for path in sorted(dirpath.rglob("*")):
        name = str(path.relative_to(dirpath))
        if path.is_symlink():
            listing[name] = "-> " + os.path.basename(os.readlink(path))
            if not path.exists() or os.path.abspath(path) in _LEFT_DANGLING:
                # Documented difference (docs/migrating.md, "No dangling last link"):
                # Lightning may leave a link whose target it evicted; ours removes it.
                # (Also once a later save under the target's name revived it.)
                listing[name] = "dangling " + listing[name]
        elif path.is_dir():
            listing[name] = "dir"
        else:
            listing[name] = "file"
            if name in preexisting and path.read_bytes() == b"junk":
                listing[name] = "junk"
                continue
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            loaded[name] = {
                "keys": sorted(ckpt),
                "epoch": ckpt.get("epoch"),
                "global_step": ckpt.get("global_step"),
                "weights": [round(float(t.sum()), 6) for t in ckpt["state_dict"].values()],
                "callbacks": callback_states(ckpt, root),
                "loops": repr(ckpt.get("loops")),
            }
    state = norm_state(callback.state_dict(), root)
    state.pop("dirpath", None)
    obs = {
        "listing": listing,
        "loaded": loaded,
        "best_model_path": rel(callback.best_model_path, root),
        "best_model_score": num(callback.best_model_score),
        "best_k_models": {rel(p, root): num(s) for p, s in callback.best_k_models.items()},
        "kth_best_model_path": rel(callback.kth_best_model_path, root),
        "kth_value": num(callback.kth_value),
        "last_model_path": rel(callback.last_model_path, root),
        "current_score": num(callback.current_score),
        "state": state,
    }
    if store is not None:
        expected = {
            f"checkpoints/{os.path.basename(name)}"
            for name, kind in listing.items()
            if kind == "file" and name.endswith(".ckpt")
        }
        obs["store_extra"] = sorted(store.keys("checkpoint") - expected)
        obs["store_missing"] = sorted(expected - store.keys("checkpoint"))
        obs["store_stale"] = sorted(
            key
            for key in expected & store.keys("checkpoint")
            if store.get(key).sha256
            not in {
                hashlib.sha256(p.read_bytes()).hexdigest()
                for p in dirpath.rglob(key.split("/", 1)[1])
                if p.is_file() and not p.is_symlink()
            }
        )
    try:
        prefix = getattr(callback, "checkpoint_key_prefix", None)
    except Exception:
        prefix = None
    if store is None and prefix is not None and not isinstance(callback, MemoryCheckpoint):
        import lamindb as ln

        rows = {
            a.key: a.size
            for a in ln.Artifact.filter(key__startswith=prefix.rstrip("/") + "/", kind="model")
        }
        files = {
            f"{prefix.rstrip('/')}/{name}": (dirpath / name).stat().st_size
            for name, kind in listing.items()
            if kind == "file" and name.endswith(".ckpt")
        }
        obs["store_extra"] = sorted(set(rows) - set(files))
        obs["store_missing"] = sorted(set(files) - set(rows))
        obs["store_stale"] = sorted(k for k in set(rows) & set(files) if rows[k] != files[k])
    return obs


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}/{k}: missing in lightning, ours={b[k]!r}")
            elif k not in b:
                out.append(f"{path}/{k}: lightning={a[k]!r}, missing in ours")
            else:
                out.extend(diff(a[k], b[k], f"{path}/{k}"))
        return out
    if a != b:
        return [f"{path}: lightning={a!r} ours={b!r}"]
    return []


def compare(
    base: Path,
    opts: dict[str, Any],
    train: dict[str, Any],
    knobs: dict[str, Any] | None = None,
    preexisting: list[str] = (),
    resume: dict[str, Any] | None = None,
    kind: str = "ours",
    last_name: str | None = None,
) -> list[str]:
    if base.exists():
        shutil.rmtree(base)
    if kind == "lamin":
        # Artifact keys derive from dirpath: make them unique to this run, so artifacts an
        # earlier run left in a reused instance can never be taken for ours.
        base = base / uuid.uuid4().hex[:10]
    ref = run_fit("lightning", base / "L", opts, train, None, list(preexisting), resume, last_name)
    ours = run_fit(kind, base / "O", opts, train, knobs, list(preexisting), resume, last_name)
    problems = []
    migrated = (resume or {}).get("first_kind") == "lightning"
    if ref.get("resumed_from") != ours.get("resumed_from"):
        problems.append(f"resumed_from: {ref.get('resumed_from')} vs {ours.get('resumed_from')}")
    for phase in ("first", "resume"):
        if phase not in ref and phase not in ours:
            continue
        o = ours.get(phase)
        if isinstance(o, dict):
            for field in ("store_extra", "store_missing", "store_stale"):
                value = o.pop(field, None)
                if migrated and (phase == "first" or field == "store_missing"):
                    continue
                if "/" in str(opts.get("filename")) and kind == "ours" and field != "store_stale":
                    continue  # MemoryCheckpoint keys by base name, by design: keys collide
                if value:
                    problems.append(f"{phase}: {field}: {value}")
        r = ref.get(phase)
        if isinstance(r, dict) and "listing" in r:
            if isinstance(o, dict) and "listing" in o:
                o["listing"] = {
                    k: v
                    for k, v in o["listing"].items()
                    if not (v.startswith("dangling") and r["listing"].get(k) == v)
                }
            r["listing"] = {k: v for k, v in r["listing"].items() if not v.startswith("dangling")}
        problems.extend(f"{phase}: {d}" for d in diff(r, o))
    return problems


# -- random cases -----------------------------------------------------------------------

SEQS = {
    "dec": [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1],
    "inc": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "tie": [1.0] * 8,
    "rep": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0],
    "nan": [1.0, NAN, 0.5, NAN, 0.7, 0.2, NAN, 0.9],
    "allnan": [NAN] * 8,
    "zig": [0.3, 0.1, 0.4, 0.1, 0.5, 0.9, 0.2, 0.6],
}


def random_case(seed: int) -> dict[str, Any]:
    r = random.Random(seed)
    monitor = r.choice([None, None, "val_loss", "val_loss", "train_loss"])
    opts: dict[str, Any] = {
        "monitor": monitor,
        "mode": r.choice(["min", "max"]),
        "save_top_k": r.choice([-1, 0, 1, 2, 3]),
        "save_last": r.choice([None, True, False, "link"]),
    }
    if monitor is None and opts["save_top_k"] not in (-1, 0, 1):
        opts["save_top_k"] = r.choice([-1, 0, 1])
    trig = r.choice(["none", "steps", "epochs", "epochs"])
    if trig == "steps":
        opts["every_n_train_steps"] = r.choice([1, 2, 3])
    elif trig == "epochs":
        opts["every_n_epochs"] = r.choice([1, 2])
    opts["save_on_train_epoch_end"] = r.choice([None, True, False])
    opts["filename"] = r.choice(
        [
            None,
            "{epoch}-{step}",
            "{epoch}-{val_loss:.2f}",
            "model",
            "m-{train_loss:.1f}",
            "{epoch}-{val/loss:.1f}",
            "{val_loss:.0f}",
        ]
    )
    opts["auto_insert_metric_name"] = r.choice([True, False])
    opts["enable_version_counter"] = r.choice([True, True, False])
    opts["save_weights_only"] = r.choice([False, False, True])
    if r.random() < 0.15:
        opts["save_on_exception"] = True
    train = {
        "train_seq": SEQS[r.choice(list(SEQS))],
        "val_seq": SEQS[r.choice(list(SEQS))],
        "n_batches": r.choice([2, 3]),
    }
    if r.random() < 0.3:
        train["max_steps"] = r.choice([3, 5, 7])
        train["max_epochs"] = -1
    else:
        train["max_epochs"] = r.choice([2, 3, 4])
    if r.random() < 0.25:
        train["check_val_every_n_epoch"] = 2
    if r.random() < 0.15:
        train["limit_val_batches"] = 0
    if r.random() < 0.15:
        train["val_check_interval"] = 0.5
        train["n_batches"] = 4
    if r.random() < 0.1:
        train["accumulate_grad_batches"] = 2
    if r.random() < 0.12:
        train["fail_at"] = r.choice([1, 2, 3, 4])
    if r.random() < 0.2:
        train["extra_callbacks"] = [
            r.choice(
                [
                    {"save_last": True, "save_top_k": 0, "monitor": None},
                    {"save_last": "link", "save_top_k": 1, "monitor": "train_loss", "mode": "max"},
                    {
                        "monitor": "val_loss",
                        "save_top_k": 2,
                        "filename": "model",
                        "every_n_epochs": 2,
                    },
                    {"monitor": None, "save_top_k": -1, "every_n_train_steps": 2},
                ]
            )
        ]
    knobs = {
        "async_write": r.choice([False, True]),
        "outbox": r.choice([True, False]),
        "max_workers": r.choice([1, 4]),
    }
    preexisting: list[str] = []
    if r.random() < 0.2:
        preexisting = [
            r.choice(["model.ckpt", "last.ckpt", "epoch=0-step=3.ckpt", "epoch=1-step=4.ckpt"])
        ]
    resume = None
    if r.random() < 0.35:
        resume = {"ckpt": r.choice(["last", "best"]), "train": {}}
        if r.random() < 0.3:
            resume["first_kind"] = "lightning"
        if "max_steps" in train:
            resume["train"]["max_steps"] = train["max_steps"] + r.choice([2, 4])
        else:
            resume["train"]["max_epochs"] = train["max_epochs"] + r.choice([1, 2])
    opts = {k: v for k, v in opts.items() if v is not None or k in ("monitor", "save_last")}
    last_name = r.choice([None] * 6 + ["{epoch}-last", "last-{step}", "mylast"])
    return {
        "opts": opts,
        "train": train,
        "knobs": knobs,
        "preexisting": preexisting,
        "resume": resume,
        "last_name": last_name,
    }


# == the tests ===========================================================================

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
]

DEFAULT_KNOBS = {"async_write": False, "outbox": True, "max_workers": 2}
KNOB_SETS = [
    pytest.param(DEFAULT_KNOBS, id="sync"),
    pytest.param({"async_write": True, "outbox": False, "max_workers": 4}, id="async-nooutbox-w4"),
    pytest.param({"async_write": True, "outbox": True, "max_workers": 1}, id="async-w1"),
]


def assert_same(problems: list[str]) -> None:
    assert not problems, "ours differs from ModelCheckpoint:\n  " + "\n  ".join(
        p[:400] for p in problems[:15]
    )


def T(train: str = "dec", val: str = "zig", **kw: Any) -> dict[str, Any]:
    return {"train_seq": SEQS[train], "val_seq": SEQS[val], "n_batches": 3, "max_epochs": 3, **kw}


# Hand-picked corner cases: (id, opts, train, extra compare() arguments).
CORNER_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    (
        "tie-val-top2-last",
        {"monitor": "val_loss", "save_top_k": 2, "save_last": True},
        T(val="tie"),
        {},
    ),
    (
        "tie-train-max-top1-steps",
        {"monitor": "train_loss", "mode": "max", "every_n_train_steps": 1},
        T(train="tie"),
        {},
    ),
    (
        "nan-val-max-top2",
        {"monitor": "val_loss", "mode": "max", "save_top_k": 2, "save_last": "link"},
        T(val="nan", max_epochs=5),
        {},
    ),
    ("allnan-val-top2", {"monitor": "val_loss", "save_top_k": 2}, T(val="allnan"), {}),
    (
        "increasing-train-min-top3",
        {"monitor": "train_loss", "save_top_k": 3, "every_n_train_steps": 1},
        T(train="inc"),
        {},
    ),
    (
        "repeat-train-top2-metric-name",
        {
            "monitor": "train_loss",
            "save_top_k": 2,
            "every_n_train_steps": 1,
            "filename": "{train_loss:.1f}",
        },
        T(train="rep"),
        {},
    ),
    (
        "fixed-name-all-versions",
        {"monitor": "val_loss", "save_top_k": -1, "filename": "model"},
        T(),
        {},
    ),
    (
        "fixed-name-top1-link",
        {"monitor": "val_loss", "save_top_k": 1, "filename": "model", "save_last": "link"},
        T(val="zig", max_epochs=4),
        {},
    ),
    (
        "fixed-name-no-version-counter",
        {"save_top_k": -1, "filename": "model", "enable_version_counter": False, "save_last": True},
        T(),
        {},
    ),
    (
        "preexisting-same-name-v1",
        {"save_top_k": -1, "filename": "model"},
        T(),
        {"preexisting": ["model.ckpt"]},
    ),
    (
        "preexisting-same-name-overwrite",
        {"save_top_k": 1, "filename": "model", "enable_version_counter": False},
        T(),
        {"preexisting": ["model.ckpt"]},
    ),
    ("preexisting-last", {"save_last": True, "save_top_k": 1}, T(), {"preexisting": ["last.ckpt"]}),
    (
        "preexisting-last-link",
        {"save_last": "link", "monitor": "val_loss", "save_top_k": 2},
        T(),
        {"preexisting": ["last.ckpt"]},
    ),
    ("top0-last", {"save_top_k": 0, "save_last": True, "every_n_train_steps": 2}, T(), {}),
    ("top0-last-link", {"save_top_k": 0, "save_last": "link"}, T(), {}),
    (
        "weights-only-link",
        {"save_weights_only": True, "save_last": "link", "monitor": "val_loss", "save_top_k": 2},
        T(),
        {},
    ),
    (
        "val-every-2-epochs",
        {
            "monitor": "val_loss",
            "save_top_k": 2,
            "save_on_train_epoch_end": False,
            "save_last": True,
        },
        T(max_epochs=5, check_val_every_n_epoch=2),
        {},
    ),
    (
        "no-val-monitor-val",
        {"monitor": "val_loss", "save_top_k": 1, "save_last": True},
        T(limit_val_batches=0),
        {},
    ),
    (
        "max-steps-mid-epoch",
        {"every_n_train_steps": 2, "save_last": True, "save_top_k": -1},
        T(max_epochs=-1, max_steps=7),
        {},
    ),
    (
        "val-check-interval",
        {"monitor": "val_loss", "save_top_k": 2, "save_last": "link"},
        T(n_batches=4, val_check_interval=0.5),
        {},
    ),
    (
        "every-2-epochs-train-end",
        {"every_n_epochs": 2, "save_on_train_epoch_end": True, "save_last": True},
        T(max_epochs=5),
        {},
    ),
    (
        "accumulate",
        {"every_n_train_steps": 1, "save_top_k": 2, "monitor": "train_loss"},
        T(accumulate_grad_batches=2, n_batches=4),
        {},
    ),
    (
        "slash-metric-subfolder",
        {"monitor": "val_loss", "save_top_k": 2, "filename": "{epoch}-{val/loss:.1f}"},
        T(),
        {},
    ),
    (
        "no-auto-metric-name",
        {
            "monitor": "val_loss",
            "save_top_k": 2,
            "filename": "{epoch}-{val_loss:.2f}",
            "auto_insert_metric_name": False,
        },
        T(),
        {},
    ),
    (
        "last-name-template",
        {"save_last": True, "save_top_k": 2, "monitor": "val_loss"},
        T(),
        {"last_name": "{epoch}-last"},
    ),
    (
        "resume-last-link",
        {"monitor": "val_loss", "save_top_k": 2, "save_last": "link"},
        T(),
        {"resume": {"ckpt": "last", "train": {"max_epochs": 5}}},
    ),
    (
        "resume-last-file",
        {"monitor": "val_loss", "save_top_k": 1, "save_last": True},
        T(),
        {"resume": {"ckpt": "last", "train": {"max_epochs": 5}}},
    ),
    (
        "resume-best-early-v1",
        {"monitor": "val_loss", "save_top_k": 2, "save_last": True},
        T(val="inc"),
        {"resume": {"ckpt": "best", "train": {"max_epochs": 5}}},
    ),
    (
        "resume-best-fixed-name",
        {"monitor": "val_loss", "save_top_k": -1, "filename": "model"},
        T(val="inc"),
        {"resume": {"ckpt": "best", "train": {"max_epochs": 4}}},
    ),
    (
        "resume-steps",
        {"every_n_train_steps": 2, "save_top_k": 2, "monitor": "train_loss", "save_last": "link"},
        T(max_epochs=-1, max_steps=5),
        {"resume": {"ckpt": "last", "train": {"max_steps": 9}}},
    ),
    (
        "migrate-from-modelcheckpoint",
        {"monitor": "val_loss", "save_top_k": 1, "save_last": True},
        T(),
        {"resume": {"ckpt": "last", "first_kind": "lightning", "train": {"max_epochs": 5}}},
    ),
    (
        "migrate-from-modelcheckpoint-link",
        {"monitor": "val_loss", "save_top_k": 2, "save_last": "link"},
        T(),
        {"resume": {"ckpt": "last", "first_kind": "lightning", "train": {"max_epochs": 5}}},
    ),
    (
        "save-on-exception",
        {
            "save_on_exception": True,
            "monitor": "train_loss",
            "every_n_train_steps": 1,
            "save_top_k": 2,
            "save_last": True,
        },
        T(fail_at=4),
        {},
    ),
    (
        "no-dirpath",
        {"monitor": "val_loss", "save_top_k": 2, "save_last": "link"},
        T(no_dirpath=True),
        {},
    ),
    (
        "no-dirpath-resume",
        {"monitor": "val_loss", "save_top_k": 1, "save_last": True},
        T(no_dirpath=True),
        {"resume": {"ckpt": "last", "train": {"max_epochs": 5}}},
    ),
    (
        "metric-name-reuse-monitor",
        {
            "monitor": "train_loss",
            "mode": "max",
            "save_top_k": 1,
            "every_n_train_steps": 1,
            "filename": "m-{train_loss:.0f}",
            "auto_insert_metric_name": False,
        },
        T(train="inc", n_batches=4),
        {},
    ),
    (
        "last-link-name-template-reuse",
        {"save_last": "link", "save_top_k": 1, "every_n_train_steps": 1},
        T(train="rep", n_batches=4),
        {"last_name": "last-{train_loss:.0f}"},
    ),
    (
        "two-callbacks-last-v1",
        {"save_last": True, "save_top_k": 1, "monitor": "val_loss"},
        T(extra_callbacks=[{"save_last": True, "save_top_k": 0}]),
        {},
    ),
]


@pytest.mark.parametrize("knobs", KNOB_SETS)
@pytest.mark.parametrize(
    ("opts", "train", "extra"), [pytest.param(*c[1:], id=c[0]) for c in CORNER_CASES]
)
def test_corner_case_matches_model_checkpoint(
    tmp_path: Path,
    opts: dict[str, Any],
    train: dict[str, Any],
    extra: dict[str, Any],
    knobs: dict[str, Any],
) -> None:
    assert_same(compare(tmp_path / "case", opts, train, knobs=knobs, **extra))


# Seeded random combinations (random_case); seeds 5000.. all matched when written.
@pytest.mark.parametrize("seed", range(5000, 5150))
def test_random_case_matches_model_checkpoint(tmp_path: Path, seed: int) -> None:
    assert_same(compare(tmp_path / "case", **random_case(seed)))


def test_the_harness_sees_a_difference(tmp_path: Path) -> None:
    """Sanity: different settings on the two sides are reported."""
    train = T()
    a = run_fit("lightning", tmp_path / "a", {"monitor": "val_loss", "save_top_k": 1}, train)
    b = run_fit(
        "ours", tmp_path / "b", {"monitor": "val_loss", "save_top_k": 2}, train, DEFAULT_KNOBS
    )
    assert diff(a["first"], b["first"])


def test_async_write_reuses_the_name_of_a_just_evicted_checkpoint_as_lightning_does(
    tmp_path: Path,
) -> None:
    """With async_write, the eviction of the previous checkpoint waits for its
    replacement's background write; when the next save's name is the evicted file's name
    (the metric in the template came back to an earlier value), Lightning's version
    counter must not see that file: ModelCheckpoint writes ``m-2.ckpt``, and so must ours
    (it wrote ``m-2-v1.ckpt``: the file still on disk, and its pending staging, took the
    name)."""
    opts = {
        "monitor": None,
        "save_top_k": 1,
        "every_n_train_steps": 1,
        "filename": "m-{train_loss:.0f}",
        "auto_insert_metric_name": False,
    }
    train = T(train="rep", n_batches=4, max_epochs=2)
    assert_same(compare(tmp_path / "case", opts, train, knobs={"async_write": True}))


def test_two_callbacks_rewriting_one_path_leave_the_later_save_as_lightning_does(
    tmp_path: Path,
) -> None:
    """Two of our callbacks in one folder save the same file name at the same step: A
    (``monitor="train_loss"``, full checkpoint) then B (``monitor=None``,
    ``save_weights_only=True``, ``enable_version_counter=False``, so it overwrites A's
    file). ModelCheckpoint leaves B's (later, weights-only) file, and that is the file
    Lightning keeps; the store's artifact of the name holds it too. Before, the two
    pipelines did not order their writes and commits of one name: with async_write the
    folder often ended with A's file (about 5 runs in 6), and with or without it the
    artifact could hold A's bytes (``store_stale``, sync: 1 to 3 runs in 12). A race,
    so it runs a few times, with and without async_write, one worker and four."""
    extra = [
        {
            "monitor": None,
            "save_top_k": -1,
            "every_n_train_steps": 1,
            "filename": "{epoch}-{step}",
            "save_weights_only": True,
            "enable_version_counter": False,
        }
    ]
    opts = {
        "monitor": "train_loss",
        "save_top_k": -1,
        "filename": "{epoch}-{step}",
        "every_n_train_steps": 1,
    }
    train = T(train="tie", n_batches=4, max_epochs=2, extra_callbacks=extra)
    for attempt in range(8):
        knobs = {"async_write": attempt % 2 == 0, "max_workers": 1 + 3 * (attempt // 2 % 2)}
        assert_same(compare(tmp_path / f"case{attempt}", opts, train, knobs=knobs))


def test_a_templated_last_name_linked_by_one_callback_and_written_by_another(
    tmp_path: Path,
) -> None:
    """``CHECKPOINT_NAME_LAST = "last-{step}"`` shared by two extra callbacks without the
    version counter: L (``save_last="link"``, top 1 by train_loss at epoch ends) and F
    (``save_last=True``, a file at every step, which removes its previous
    ``last-step=N.ckpt``), with async_write and one worker. ModelCheckpoint ends without
    ``last-step=3.ckpt`` (F removed it once ``last-step=4.ckpt`` was saved); ours kept it
    in about 1 run in 2 (found by a randomized sweep, seed 8075): L's link over F's
    ``last-step=4.ckpt``, made as Lightning makes it (remove, then link), left the name
    empty for a moment, and F's removal, waiting on F's intake thread for that name to be
    written, looked then and kept ``last-step=3.ckpt``. The link is now renamed over the
    file (see ``test_a_link_replacing_a_file_never_leaves_its_name_empty``)."""
    extra = [
        {
            "save_last": "link",
            "save_top_k": 1,
            "monitor": "train_loss",
            "mode": "max",
            "enable_version_counter": False,
        },
        {
            "save_last": True,
            "save_top_k": 0,
            "monitor": None,
            "mode": "min",
            "enable_version_counter": False,
            "every_n_train_steps": 1,
        },
    ]
    opts = {
        "monitor": "val_loss",
        "mode": "max",
        "save_top_k": 0,
        "every_n_epochs": 1,
        "save_on_train_epoch_end": False,
        "filename": "{epoch}-{val/loss:.1f}",
        "auto_insert_metric_name": False,
    }
    case = random_case(8075)
    train = {**case["train"], "extra_callbacks": extra}
    for attempt in range(4):
        knobs = {"async_write": True, "max_workers": 1}
        assert_same(
            compare(tmp_path / f"case{attempt}", opts, train, knobs=knobs, last_name="last-{step}")
        )


def test_a_link_replacing_another_callbacks_last_file_is_persisted_as_lightning_keeps_it(
    tmp_path: Path,
) -> None:
    """Two of our callbacks share ``CHECKPOINT_NAME_LAST`` ("mylast") in one folder: A
    writes it as a file (``save_last=True``, ``enable_version_counter=False``), B links it
    (``save_last="link"``). ModelCheckpoint ends with ``mylast.ckpt`` a link and ``fit``
    returns; no artifact is left for the name. Before, A's job for the file B's link
    replaced could fail (``fit`` raised ``PersistenceError: ... mylast.ckpt did not exist
    when it was to be persisted``, also with async_write=False), or leave an artifact
    ``checkpoints/mylast.ckpt`` for a path that is a link (``store_extra``), or (async_write)
    the folder ended with ``mylast.ckpt`` a file instead of a link (and a pending link of
    B's, made after A's later file, replaced it: A's job then failed). A race, so it runs
    a few times."""
    case = random_case(5250)  # the fuzz case that found it
    for attempt in range(8):
        knobs = {
            "async_write": attempt % 2 == 0,
            "max_workers": 1 + 3 * (attempt // 2 % 2),
            "outbox": attempt >= 4,
        }
        assert_same(compare(tmp_path / f"case{attempt}", **{**case, "knobs": knobs}))


def test_a_last_link_in_a_folder_that_does_not_exist_fails_at_that_save_as_lightning_does(
    tmp_path: Path,
) -> None:
    """``CHECKPOINT_NAME_LAST = "sub/last"`` with ``save_last="link"``, no checkpoint ever
    written in ``sub/``: Lightning's link, and its fallback copy, fail there, and ``fit``
    raises ``FileNotFoundError`` naming ``sub/last.ckpt`` at the first save. Ours raised it
    naming a temporary link (``sub/.last.ckpt.PID.ID.link``); with async_write the link is
    made by the thread that wrote the file, where the failure was only logged: ``fit``
    went on to the end, with ``last_model_path`` naming a link that never existed. The
    link's folder is now looked at on the training thread, at the save."""
    opts = {"monitor": "val_loss", "save_top_k": 2, "save_last": "link"}
    for attempt, async_write in enumerate([False, True]):
        knobs = {"async_write": async_write, "max_workers": 1}
        assert_same(
            compare(tmp_path / f"case{attempt}", opts, T(), knobs=knobs, last_name="sub/last")
        )


def _no_room_for_last_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk with no room left for ``last.ckpt``: its link and Lightning's fallback copy
    (also ours, made under a temporary name beside it) fail with ENOSPC."""
    import errno

    symlink, copy = os.symlink, shutil.copy

    def refused(dst: Any) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    def no_link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if "last" in os.path.basename(os.fspath(dst)):
            raise refused(dst)
        symlink(src, dst, *args, **kwargs)

    def no_copy(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if "last" in os.path.basename(os.fspath(dst)):
            raise refused(dst)
        return copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", no_link)
    monkeypatch.setattr(shutil, "copy", no_copy)


def test_a_last_link_that_cannot_be_made_raises_the_error_lightning_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``save_last="link"`` on a disk that refuses the link and its fallback copy:
    ModelCheckpoint's ``fit`` raises ``OSError: [Errno 28] ... ckpts/last.ckpt`` at the
    first save. Ours raised it naming the temporary link it renames into place
    (``.last.ckpt.PID.ID.link``)."""
    _no_room_for_last_links(monkeypatch)
    opts = {"monitor": "val_loss", "save_top_k": 2, "save_last": "link"}
    assert_same(compare(tmp_path / "case", opts, T(), knobs={"async_write": False}))


def test_a_last_link_that_fails_after_its_background_write_is_raised_out_of_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With async_write the link is made by the thread that wrote its target; when it
    failed (no room for it nor for the fallback copy), the error was only logged there,
    and ``fit`` returned as if all was well, ``last_model_path`` naming a link never made
    (ModelCheckpoint's ``fit`` raises it). It is now raised on the training thread, at
    the next save (before Lightning changes its state for it) or at teardown: when
    depends on how soon the write is done, so only the error is compared here."""
    import errno

    _no_room_for_last_links(monkeypatch)
    store = MemoryStore()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpts",
        monitor="val_loss",
        save_top_k=2,
        save_last="link",
        async_write=True,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=3,
        callbacks=[callback],
    )
    model = SeqModel(SEQS["dec"], SEQS["zig"])
    with pytest.raises(OSError) as raised:
        trainer.fit(model, loader(3), loader(2))
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "ckpts" / "last.ckpt")
    assert not (tmp_path / "ckpts" / "last.ckpt").exists()


def test_a_last_link_failure_of_a_fit_that_crashed_is_not_raised_by_the_next_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fit that crashes (its training step raises) after a save whose link (save_last=
    "link", async_write) failed on the writer thread: the crash is what ``fit`` raises, as
    with ModelCheckpoint, whose own fit would have stopped at that link. The link's error
    was kept for a save or a teardown that never came, and the next fit with the same
    callback, on a disk with room again, raised it at its first save: an ``OSError`` of
    the fit before, naming a link that this fit makes without trouble."""
    from helpers import TinyModel, make_trainer
    from helpers import loader as batches

    _no_room_for_last_links(monkeypatch)
    store = MemoryStore()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        save_top_k=-1,
        save_last="link",
        async_write=True,
    )
    with pytest.raises(RuntimeError, match="boom at step 1"):
        make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(fail_at_step=1), batches(4))
    assert not os.path.lexists(tmp_path / "ckpts" / "last.ckpt")  # the link was refused
    monkeypatch.undo()  # room again
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), batches(4))
    assert os.path.islink(tmp_path / "ckpts" / "last.ckpt")
