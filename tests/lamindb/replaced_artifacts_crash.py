"""Training that SIGKILLs itself while an observer is told of the 2nd save of last.ckpt."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import pytest
from lamindb_tier import TierData, TierModel, block_network, make_trainer

import lamin_lightning as ll


class KillAtSecondLast:
    def __init__(self, prefix_file: Path, callback: Any) -> None:
        self.n, self.prefix_file, self.callback = 0, prefix_file, callback

    def on_artifact_saved(self, event: Any) -> None:
        if event.kind == "checkpoint" and event.key.endswith("/last.ckpt"):
            self.n += 1
            if self.n == 2:
                self.prefix_file.write_text(self.callback.checkpoint_key_prefix)
                os.kill(os.getpid(), signal.SIGKILL)

    def on_artifact_removed(self, event: Any) -> None:
        pass


def main() -> None:
    dirpath, prefix_file = Path(sys.argv[1]), Path(sys.argv[2])
    guard = pytest.MonkeyPatch()
    block_network(guard)
    callback = ll.Checkpoint(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=1)
    callback.add_artifact_observer(KillAtSecondLast(prefix_file, callback))
    trainer = make_trainer(dirpath.parent, [callback], max_steps=2)
    trainer.fit(TierModel(), datamodule=TierData(n=2))


if __name__ == "__main__":
    main()
