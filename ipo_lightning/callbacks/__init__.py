"""Lightning callbacks of ipo-lightning."""

from ipo_lightning.callbacks.export import HFExport

__all__ = ["HFExport"]
