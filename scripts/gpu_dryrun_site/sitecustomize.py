"""For CPU dry runs of ``scripts/gpu_check.sh``: packages the GPU machine lacks, and that no wheel of
``.whl/`` brings, look not installed here either (no module to import, no distribution metadata), so a
dry run fails where the GPU machine would. Put this folder first on ``PYTHONPATH``::

    PYTHONPATH=scripts/gpu_dryrun_site:/tmp/site_check GPU_CHECK_ACCELERATOR=cpu GPU_CHECK_SMALL=1 \\
        PYTHON=.venv/bin/python bash scripts/gpu_check.sh
"""

import importlib.machinery as machinery
import sys
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec
from importlib.metadata import Distribution
from types import ModuleType
from typing import Any

ABSENT = {"wandb", "matplotlib", "flash_attn"}
"""Top-level modules (and distribution names, dashes as underscores) the GPU machine does not have."""


class _AbsentFinder(machinery.PathFinder):
    """The standard path finder, blind to :data:`ABSENT`."""

    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is None and fullname.split(".")[0] in ABSENT:
            return None
        return super().find_spec(fullname, path, target)

    @classmethod
    def find_distributions(cls, *args: Any, **kwargs: Any) -> Iterator[Distribution]:
        for dist in super().find_distributions(*args, **kwargs):
            if (dist.metadata["Name"] or "").lower().replace("-", "_") not in ABSENT:
                yield dist


sys.meta_path[sys.meta_path.index(machinery.PathFinder)] = _AbsentFinder
