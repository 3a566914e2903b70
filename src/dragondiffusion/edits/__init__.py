"""Each edit builds an `EditPlan` for the one shared sampler."""

from .appearance import AppearanceWeights, plan_appearance
from .drag import DragWeights, plan_drag
from .move import MoveWeights, move_kind, plan_move
from .paste import PasteWeights, plan_paste

__all__ = [
    "AppearanceWeights",
    "DragWeights",
    "MoveWeights",
    "PasteWeights",
    "move_kind",
    "plan_appearance",
    "plan_drag",
    "plan_move",
    "plan_paste",
]
