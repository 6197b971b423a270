"""Lightning glue: the training system and its callbacks."""

from flows.lit.callbacks import ToyPlots
from flows.lit.module import DensityModule, NonFiniteError

__all__ = ["DensityModule", "NonFiniteError", "ToyPlots"]
