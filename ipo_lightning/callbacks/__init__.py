"""Lightning callbacks of ipo-lightning."""

from ipo_lightning.callbacks.divergence_monitor import DivergenceMonitor
from ipo_lightning.callbacks.export import HFExport

__all__ = ["DivergenceMonitor", "HFExport"]
