"""Resume training from a checkpoint persisted by an earlier run (LaminDB layer).

:func:`checkpoint_path` finds the checkpoint artifact flagged ``is_best_model``
or ``is_last_model`` under a key prefix or of a run, caches it locally and
returns the path for ``trainer.fit(ckpt_path=...)``; it records that artifact as an
input of the active run (the run that resumes), so the lineage reads "trained from".
lamindb is imported on call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from lamin_lightning._errors import LaminSetupError
from lamin_lightning._lamin_features import FEATURE_TYPE_NAME
from lamin_lightning._lamin_features import require_instance as _require_instance

_WHICH_FEATURE = {"best": "is_best_model", "last": "is_last_model"}
_SHOWN = 5

log = logging.getLogger("lamin_lightning")


def checkpoint_path(
    prefix: str | None = None,
    *,
    run: Any = None,
    which: Literal["best", "last"] = "best",
) -> Path:
    """The local path of an earlier run's best or last checkpoint, downloaded if needed.

    Give exactly one of ``prefix`` or ``run``. The checkpoint is the artifact
    (``kind="model"``) whose feature ``is_best_model`` (``which="best"``) or
    ``is_last_model`` (``which="last"``) is True, as set by
    :class:`lamin_lightning.Checkpoint` after :func:`save_lightning_features`.

    The artifact is recorded as an input of the active run (``ln.context.run``), the
    one that resumes from it: call ``ln.track()`` *before* this function. Without an
    active run nothing is recorded, and a warning says so. Nothing is recorded either
    when the active run created the checkpoint itself (LaminDB keeps lineage acyclic)
    or when ``ln.settings.track_run_inputs`` is False.

    Args:
        prefix: A key prefix: the callback's ``checkpoint_key_prefix`` or its
            ``base_prefix`` (a trailing slash is ignored). Searched are artifacts
            whose key starts with ``prefix + "/"``.
        run: A ``lamindb.Run`` or its uid: searched are the checkpoints created by it.
        which: ``"best"`` or ``"last"``.

    Returns:
        The local path of the cached checkpoint (``artifact.cache()``), for
        ``trainer.fit(model, ckpt_path=...)``.

    Raises:
        ValueError: Neither or both of ``prefix`` and ``run``; an empty prefix; an
            invalid ``which``.
        TypeError: ``prefix`` or ``run`` of the wrong type.
        LookupError: No run of that uid; no flagged checkpoint; more than one.
        LaminSetupError: No LaminDB instance, or the features are missing.

    Example::

        ln.track()  # first: the checkpoint becomes an input of this run
        path = ll.checkpoint_path(callback.checkpoint_key_prefix, which="last")
        trainer.fit(model, datamodule, ckpt_path=path)
    """
    if which not in _WHICH_FEATURE:
        raise ValueError(
            f"which must be 'best' or 'last', got {which!r}: 'best' resumes from the"
            " checkpoint flagged is_best_model, 'last' from the one flagged is_last_model"
        )
    if (prefix is None) == (run is None):
        given = "both" if prefix is not None else "neither"
        raise ValueError(
            f"checkpoint_path() got {given} of prefix and run; pass exactly one: prefix="
            "callback.checkpoint_key_prefix (or callback.base_prefix) of the earlier fit, or"
            " run=<the lamindb.Run that trained it, or its uid>"
        )
    ln = _require_instance()
    flag = _flag_feature(ln, _WHICH_FEATURE[which])
    if prefix is not None:
        if not isinstance(prefix, str):
            raise TypeError(
                f"prefix must be a str key prefix such as callback.checkpoint_key_prefix,"
                f" got {type(prefix).__name__}"
            )
        stem = prefix.rstrip("/")
        if not stem:
            raise ValueError(
                f"prefix={prefix!r} is empty and would match every checkpoint of the instance;"
                " pass callback.checkpoint_key_prefix, or run=..."
            )
        scope = ln.Artifact.filter(key__startswith=stem + "/", kind="model")
        searched = f"checkpoint artifacts (kind='model') with keys under {stem + '/'!r}"
    else:
        run_record = _resolve_run(ln, run)
        scope = ln.Artifact.filter(run=run_record, kind="model")
        searched = f"checkpoint artifacts (kind='model') created by run {run_record.uid!r}"
    found = list(scope.filter(flag == True).order_by("key"))  # noqa: E712 - a feature query
    if not found:
        total = scope.count()
        if total == 0:
            hint = (
                "there are none at all: check the prefix (print callback.checkpoint_key_prefix"
                " after fit) or the run"
            )
        else:
            hint = (
                f"{total} exist, none flagged {flag.name}=True: were they saved by"
                " lamin_lightning.Checkpoint (or lamindb's) with save_lightning_features()"
                " run before training?"
            )
        raise LookupError(f"no {which} checkpoint found among {searched}; {hint}")
    if len(found) > 1:
        listed = ", ".join(f"{a.key!r} (uid {a.uid})" for a in found[:_SHOWN])
        more = f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
        raise LookupError(
            f"{len(found)} checkpoints flagged {flag.name}=True among {searched}: {listed}{more}."
            " Narrow the search: pass the full callback.checkpoint_key_prefix of one fit as"
            " prefix (one Checkpoint callback, one run), or load the artifact you mean"
            " yourself with ln.Artifact.get(uid).cache()"
        )
    artifact = found[0]
    path = Path(str(artifact.cache(is_run_input=False)))
    _record_as_run_input(ln, artifact)
    return path


def _record_as_run_input(ln: Any, artifact: Any) -> None:
    """Record ``artifact`` as an input of the active run, or warn that there is none."""
    if not ln.settings.track_run_inputs:
        return  # turned off for this session: lamindb's own cache() would not record either
    run = ln.context.run
    if run is None:
        log.warning(
            "lamin-lightning: checkpoint_path() found %r (uid %s), but no LaminDB run is"
            " active, so it is not recorded as an input of the run that resumes from it."
            " Call ln.track() before checkpoint_path()",
            artifact.key,
            artifact.uid,
        )
        return
    from lamindb.models._lineage import track_run_inputs

    # Skipped by lamindb when ``run`` created the artifact (resuming inside the same run).
    track_run_inputs(artifact, is_run_input=run)


def _flag_feature(ln: Any, name: str) -> Any:
    feature_type = ln.Feature.filter(name=FEATURE_TYPE_NAME, is_type=True).one_or_none()
    feature = (
        ln.Feature.filter(name=name, type=feature_type).one_or_none()
        if feature_type is not None
        else None
    )
    if feature is None:
        raise LaminSetupError(
            f"the feature {name!r} (type {FEATURE_TYPE_NAME!r}) is missing from this LaminDB"
            " instance, so no checkpoint can be flagged with it. Run"
            " lamin_lightning.save_lightning_features() once before training; checkpoints"
            " saved before that carry no flags"
        )
    return feature


def _resolve_run(ln: Any, run: Any) -> Any:
    if isinstance(run, str):
        record = ln.Run.filter(uid=run).one_or_none()
        if record is None:
            raise LookupError(
                f"run={run!r}: no run with this uid in the connected instance; pass the uid"
                " of the run that trained (run.uid), or prefix=callback.checkpoint_key_prefix"
            )
        return record
    if isinstance(run, ln.Run):
        if run.id is None:
            raise ValueError(f"run={run!r} is not saved, so it created no checkpoints")
        return run
    raise TypeError(f"run must be a lamindb.Run or its uid (str), got {type(run).__name__}")
