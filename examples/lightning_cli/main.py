"""Train a small regression model from a LightningCLI config; checkpoints go to LaminDB.

    python main.py fit --config config.yaml

Every checkpoint is written locally by Lightning and persisted in the background
by ``lamin_lightning.Checkpoint`` (configured in ``config.yaml``, async knobs
included). ``lamin_lightning.SaveConfigCallback`` saves the resolved config as
an artifact next to the checkpoints, as an input of the run.

Needs a LaminDB instance (``lamin init --storage ./lamin-data``, or connect one)
and ``jsonargparse[signatures]`` (``pip install "lightning[extra]"``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import lamin_lightning as ll
import lamindb as ln

Batch = tuple[torch.Tensor, ...]


class Regressor(pl.LightningModule):
    """A two-layer MLP fitting ``y = x @ w + noise``.

    Args:
        hidden: Width of the hidden layer.
        lr: Learning rate of Adam.
    """

    def __init__(self, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()  # hidden and lr become features of the run, if defined
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SyntheticData(pl.LightningDataModule):
    """Random linear data, the same for a given ``seed``.

    Args:
        samples: Number of samples, split 80/20 into training and validation.
        batch_size: Batch size of both loaders.
        seed: Seed of the data and of the split.
    """

    def __init__(self, samples: int = 512, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.samples, self.batch_size, self.seed = samples, batch_size, seed

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.samples, 8, generator=generator)
        w = torch.randn(8, 1, generator=generator)
        y = x @ w + 0.1 * torch.randn(self.samples, 1, generator=generator)
        n_val = self.samples // 5
        self.train_set, self.val_set = random_split(
            TensorDataset(x, y), [self.samples - n_val, n_val], generator=generator
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def main() -> None:
    # Create the lamindb.lightning features once per instance (a no-op when they exist),
    # so that checkpoints get is_best_model, is_last_model, score and model_rank.
    ll.save_lightning_features()
    # A run for this script: checkpoint keys then carry its uid, and the config
    # becomes one of its inputs.
    ln.track()
    cli = LightningCLI(
        Regressor,
        SyntheticData,
        save_config_callback=ll.SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
    )
    checkpoint = cli.trainer.checkpoint_callback
    assert isinstance(checkpoint, ll.Checkpoint), "config.yaml configures a Checkpoint"
    stats = checkpoint.persistence_stats
    print(f"checkpoints under {checkpoint.checkpoint_key_prefix}/")
    print(
        f"saved {stats.saved}, removed {stats.removed}, failed {stats.failed},"
        f" retried {stats.retried}; training waited {stats.training_stall_seconds:.3f} s"
        f" in {stats.admission_waits} of {stats.submitted} submissions"
    )
    ln.finish()


if __name__ == "__main__":
    main()
