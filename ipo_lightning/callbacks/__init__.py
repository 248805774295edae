"""Lightning callbacks of ipo-lightning."""

from ipo_lightning.callbacks.divergence_monitor import DivergenceMonitor
from ipo_lightning.callbacks.export import HFExport
from ipo_lightning.callbacks.generation_eval import GenerationEval
from ipo_lightning.callbacks.kl_budget import KLBudget

__all__ = ["DivergenceMonitor", "GenerationEval", "HFExport", "KLBudget"]
