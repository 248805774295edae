"""Preference data: sources, record formats, tokenisation, the pairwise collator and the DataModule.

The names below load their module on first use (``__getattr__``), so importing one light submodule
(``ipo_lightning.data.subset``, say, for a config check) does not import datasets and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ipo_lightning.data.collator import PairwiseCollator
    from ipo_lightning.data.datamodule import PreferenceDataModule
    from ipo_lightning.data.sources import DataSource
    from ipo_lightning.data.tokenize import PairTokenizer

_MODULES = {
    "DataSource": "sources",
    "PairTokenizer": "tokenize",
    "PairwiseCollator": "collator",
    "PreferenceDataModule": "datamodule",
}
"""Each exported name -> the submodule that defines it."""

__all__ = ["DataSource", "PairTokenizer", "PairwiseCollator", "PreferenceDataModule"]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` (once: Python caches it in ``sys.modules``)."""
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
