"""A Lightning run with torchmem's callback: memory metrics in the logger, a leak check each epoch.

    pip install torchmem[lightning]
    python examples/lightning_train.py [--leak]

Trains a small regressor on synthetic data for 3 epochs on the CPU. The
callback logs ``torchmem/peak_bytes`` and ``torchmem/current_bytes`` every
step through ``self.log`` (here into a CSV file, any Lightning logger works),
checks for leaks at each epoch's end and prints the distributed summary at the
end. ``--leak`` keeps a tensor per step by mistake: the check names the line
from the second epoch on and, with ``raise_on_leak=True``, stops the run.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

import torchmem
from torchmem.integrations.lightning import TorchmemCallback


class Regressor(pl.LightningModule):
    def __init__(self, leak: bool) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 1))
        self.leak = leak
        self.history: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.leak:
            self.history.append(loss)  # keeps every step's loss tensor: the leak
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leak", action="store_true", help="keep each step's loss by mistake")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="lightning-run", help="logs and traces go here")
    args = parser.parse_args()

    # Made first: it enables torchmem before the Trainer or the model touch a GPU.
    callback = TorchmemCallback(raise_on_leak=args.leak,
                                trace_dir=os.path.join(args.out, "traces"))
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 32, generator=g),
                                          torch.randn(256, 1, generator=g))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1,
                         logger=CSVLogger(args.out), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[callback])
    try:
        trainer.fit(Regressor(args.leak), torch.utils.data.DataLoader(data, batch_size=32))
    except torchmem.LeakError as exc:  # raise_on_leak: the run stops at the first growth
        print(f"stopped at epoch {exc.result.index}: a site grew (the report is above)",
              file=sys.stderr)
        sys.exit(1)
    for result in callback.epoch_results:
        print(result.report())
    step, metrics = callback.logged[-1]
    print(f"last step logged ({step}): " + ", ".join(f"{k} {v:,.0f}" for k, v in metrics.items()))
    print(f"metrics: {os.path.join(trainer.logger.log_dir, 'metrics.csv')}")


if __name__ == "__main__":
    main()
