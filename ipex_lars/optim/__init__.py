"""LARS and its schedules: ``from ipex_lars.optim import LARS, lars_param_groups, WarmupPolyLR``."""

from ipex_lars.optim.lars import LARS
from ipex_lars.optim.param_groups import lars_param_groups
from ipex_lars.optim.schedule import WarmupPolyLR

__all__ = ["LARS", "lars_param_groups", "WarmupPolyLR"]
