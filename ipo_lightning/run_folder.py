"""One run folder per run, decided once and shared by every process of the run.

Every process of a multi-process run builds its own loggers, and Lightning's loggers number their
folders (``version_N``) by listing the disk: two processes racing can pick different numbers. Here the
name is decided without a race:

- ``run.name`` when given (rerunning with the same name continues that run);
- under SLURM, ``slurm-<job id>``: every task derives the same name, and a requeued job (same job id)
  lands in the same folder, where it finds its checkpoints and its W&B run id;
- under torchrun, ``torchrun-<rdzv id>`` (``--rdzv-id``);
- otherwise the next free ``version_N``, reserved by the launching process with an exclusive
  ``mkdir`` (two runs started together in one root take two numbers), which hands it to the
  processes Lightning starts for DDP through an environment variable tied to its process id.

:func:`reserve_run_folder` creates the folder and says whether this start created it, so a run that
fails during start-up can remove a folder that holds nothing of a run (:func:`discard_run_folder`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from ipo_lightning.errors import ConfigError

RUN_NAME_ENV = "IPO_LIGHTNING_RUN_NAME"
"""``<pid>:<name>``: the run folder chosen by process ``pid`` for the processes it launches."""
WANDB_ID_FILE = "wandb_run_id"
"""File in the run folder holding the W&B run id, so a resumed run continues the same W&B run."""
_VERSION = re.compile(r"version_(\d+)$")


def slurm_job_id() -> str | None:
    """The SLURM job id (``<array job>_<task>`` for array jobs), or None outside a SLURM job."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def next_version(root: str | Path) -> str:
    """``version_N`` with N one above the highest existing ``version_*`` folder in ``root`` (0 if none)."""
    root = Path(root)
    numbers = (
        [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))] if root.is_dir() else []
    )
    return f"version_{max(numbers, default=-1) + 1}"


def _inherited_run_name() -> str | None:
    """The name chosen by this process's parent when Lightning's DDP launcher started it, else None."""
    pid, _, value = os.environ.get(RUN_NAME_ENV, "").partition(":")
    launched = os.environ.get("LOCAL_RANK", "0") != "0"  # Lightning's launcher sets it in its children
    if launched and value and pid.isdigit() and int(pid) == os.getppid():
        return value
    return None


def _derived_run_name(name: str | None) -> str | None:
    """The folder name every process of the run derives alike, or None when it must be reserved."""
    if name:
        if Path(name).name != name or name in (".", ".."):
            raise ConfigError(f"run.name must be a plain folder name, got {name!r}")
        return name
    if SLURMEnvironment.detect():
        job_id = slurm_job_id()
        if job_id:
            return f"slurm-{job_id}"
    if TorchElasticEnvironment.detect():
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id == "none":
            raise ConfigError(
                "run.name is not set and torchrun has no --rdzv-id: set run.name so that every process "
                "writes to the same run folder"
            )
        return f"torchrun-{run_id}"
    return None


@dataclass(frozen=True)
class RunFolder:
    """A reserved run folder.

    Attributes:
        path: ``<root>/<name>``, existing.
        name: the folder's name.
        fresh: this process found the folder absent or empty, so nothing in it predates this start
            (always False in a process started by Lightning's DDP launcher: its parent reserved it).
    """

    path: Path
    name: str
    fresh: bool


def reserve_run_folder(root: str | Path, name: str | None) -> RunFolder:
    """Create the run folder inside ``root`` (module docstring for the name) and return it.

    A ``version_N`` folder is taken with an exclusive ``mkdir``: when another run created that number
    first, the next one is tried, so concurrent runs never share a folder. A derived name (``run.name``,
    SLURM, torchrun, a DDP child's inherited name) is shared on purpose and created if missing.
    """
    root = Path(root)
    inherited = _inherited_run_name() if not name else None
    if inherited is not None:  # the launching process reserved it and owns it
        return RunFolder(path=root / inherited, name=inherited, fresh=False)
    derived = _derived_run_name(name)
    if derived is not None:
        path = root / derived
        fresh = not path.is_dir() or not any(path.iterdir())
        path.mkdir(parents=True, exist_ok=True)
        return RunFolder(path=path, name=derived, fresh=fresh)
    root.mkdir(parents=True, exist_ok=True)
    number = int(next_version(root).removeprefix("version_"))
    while True:
        path = root / f"version_{number}"
        try:
            path.mkdir()
        except FileExistsError:  # another run took this number since the listing
            number += 1
            continue
        return RunFolder(path=path, name=path.name, fresh=True)


def discard_run_folder(folder: RunFolder) -> bool:
    """Remove ``folder`` if this start created it (``fresh``) and no run started in it; True if removed.

    For a run that stopped during start-up (bad data, a bad setting): an empty run folder, or one with
    only the loggers' start-up files, would look like a run. A folder that held anything before this
    start (a run being resumed) is never touched.
    """
    if not folder.fresh or not folder.path.is_dir():
        return False
    shutil.rmtree(folder.path, ignore_errors=True)
    return not folder.path.exists()


def share_run_name(name: str) -> None:
    """Hand ``name`` to the processes this one launches (Lightning's DDP launcher copies the env)."""
    os.environ[RUN_NAME_ENV] = f"{os.getpid()}:{name}"


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id stored in ``run_dir``, or a new one (written later, once the run has started)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    return secrets.token_hex(4)  # W&B ids are short lowercase alphanumerics


def save_wandb_run_id(run_dir: str | Path, run_id: str) -> None:
    """Write ``run_id`` into ``run_dir`` unless it is there already (atomic: write, then rename)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip() == run_id:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{WANDB_ID_FILE}.{os.getpid()}")
    staging.write_text(run_id + "\n")
    staging.replace(path)
