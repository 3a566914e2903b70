"""Each edit builds an `EditPlan` for the one shared sampler."""

from .move import MoveWeights, plan_move

__all__ = ["MoveWeights", "plan_move"]
