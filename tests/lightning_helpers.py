"""A tiny Lightning model with a named encoder, and a Trainer factory, for the integration tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Collapser(nn.Module):
    """Identity, or (enabled) every row mapped to the same constant vector: complete collapse of the output."""

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.enabled = enabled

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * 0 + 1.0 if self.enabled else z


class Poison(nn.Module):
    """Overwrite the first ``rows`` rows with NaN (no gradient flows through them, so the weights stay finite)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return z
        z = z.clone()
        z[: self.rows] = float("nan")
        return z


class TinyModel(pl.LightningModule):
    """Regression on random data; ``encoder`` is the watched layer. ``nan_rows`` poisons part of each batch."""

    def __init__(self, collapse: bool = False, nan_rows: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), Collapser(collapse), Poison(nan_rows)
        )
        self.head = nn.Linear(16, 1)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
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


def shard_every_linear(module: nn.Module, mesh: object) -> None:
    """FSDP2 for the multi-process tests' models: each Linear, then the root, sharded over ``mesh`` (a LightningModule's
    ``device_mesh["data_parallel"]`` under ``ModelParallelStrategy``, from ``configure_model``)."""
    from torch.distributed.fsdp import fully_shard

    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
