"""The wait of a replay for this process's own upload of a key (``_lamin_store``)."""

from __future__ import annotations

import os
import select
import threading

import pytest

from lamin_lightning import _lamin_store


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_wait_for_an_upload_of_its_parent(tmp_path: object) -> None:
    """An upload in flight in the parent at a fork is not the child's: its thread did not
    come with the fork, and nothing in the child ever ends it. A transfer of the same key
    and content in the child (a fit of its own) waited for it forever."""
    started, release = threading.Event(), threading.Event()

    def upload() -> None:
        with _lamin_store._uploading("checkpoints/last.ckpt", "digest"):
            started.set()
            release.wait()

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        assert started.wait(timeout=60)
        read_r, read_w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            try:
                waited = _lamin_store._wait_for_upload_here("checkpoints/last.ckpt", "digest")
                os.write(read_w, b"waited" if waited else b"free")
            finally:
                os._exit(0)
        os.close(read_w)
        try:
            # A hang guard only: the child answers at once, or never.
            ready, _, _ = select.select([read_r], [], [], 30)
            answer = os.read(read_r, 16) if ready else b"<hung>"
        finally:
            if not ready:
                os.kill(child, 9)
            os.waitpid(child, 0)
            os.close(read_r)
        assert answer == b"free"
    finally:
        release.set()
        thread.join()
    # The parent still waits for its own uploads.
    assert not _lamin_store._wait_for_upload_here("checkpoints/last.ckpt", "digest")
