"""Datasets by name and the batch loader the engine uses."""

from ipex_lars.data.loader import BatchPlan, TensorData
from ipex_lars.data.sources import build_datasets

__all__ = ["BatchPlan", "TensorData", "build_datasets"]
