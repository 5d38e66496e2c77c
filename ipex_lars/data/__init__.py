"""Datasets by name and the batch loader the engine uses."""

from ipex_lars.data.folder import write_skipped
from ipex_lars.data.loader import BatchPlan, TensorData, epoch_batches, eval_batches
from ipex_lars.data.sources import build_datasets

__all__ = ["BatchPlan", "TensorData", "build_datasets", "epoch_batches", "eval_batches", "write_skipped"]
