"""Preference data: sources, record formats, tokenisation, the pairwise collator and the DataModule."""

from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.data.datamodule import PreferenceDataModule
from ipo_lightning.data.sources import DataSource
from ipo_lightning.data.tokenize import PairTokenizer

__all__ = ["DataSource", "PairTokenizer", "PairwiseCollator", "PreferenceDataModule"]
