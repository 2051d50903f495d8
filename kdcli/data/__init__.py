"""Data: sets (ImageFolder, CIFAR, synthetic), how images are fed to a model, and the seeded views and loaders."""

from kdcli.data.config import DataConfig, Renormalize
from kdcli.data.sources import DataSource, open_data, open_eval_data
from kdcli.data.views import EvalView, TrainView, auto_workers, epoch_batches, eval_loader, train_loader

__all__ = ["DataConfig", "DataSource", "EvalView", "Renormalize", "TrainView", "auto_workers", "epoch_batches",
           "eval_loader", "open_data", "open_eval_data", "train_loader"]
