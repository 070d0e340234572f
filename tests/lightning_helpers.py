"""A tiny Lightning model with a named encoder, and a Trainer factory, for the integration tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModel(pl.LightningModule):
    """Regression on random data; ``encoder`` is the watched layer. ``nan_rows`` poisons part of each batch."""

    def __init__(self, collapse: bool = False, nan_rows: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 1)
        self.collapse = collapse
        self.nan_rows = nan_rows
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nan_rows:
            x = x.clone()
            x[: self.nan_rows] = float("nan")
        z = self.encoder(x)
        if self.collapse:
            z = z * 0 + z.mean()  # every row the same: complete collapse
        return self.head(torch.nan_to_num(z))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n: int = 512, batch_size: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = x[:, :1] * 2 + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": CSVLogger(str(tmp_path), name="logs"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
