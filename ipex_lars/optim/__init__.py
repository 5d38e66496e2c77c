"""LARS and its schedules: ``from ipex_lars.optim import LARS, lars, lars_param_groups, WarmupPolyLR``.

``LARS`` is the optimizer; ``lars`` the functional step it calls, for code that keeps its own state.
"""

from ipex_lars.optim.functional import lars
from ipex_lars.optim.optimizer import LARS
from ipex_lars.optim.param_groups import lars_param_groups
from ipex_lars.optim.schedule import WarmupPolyLR

__all__ = ["LARS", "lars", "lars_param_groups", "WarmupPolyLR"]
