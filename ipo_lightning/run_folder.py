"""One run folder per run, decided once and shared by every process of the run.

Every process of a multi-process run builds its own loggers, and Lightning's loggers number their
folders (``version_N``) by listing the disk: two processes racing can pick different numbers. Here the
name is decided without a race:

- ``run.name`` when given (rerunning with the same name continues that run);
- under SLURM, ``slurm-<job id>``: every task derives the same name, and a requeued job (same job id)
  lands in the same folder, where it finds its checkpoints and its W&B run id;
- under torchrun, ``torchrun-<rdzv id>`` (``--rdzv-id``);
- otherwise the next free ``version_N``, chosen by the launching process, which hands it to the
  processes Lightning starts for DDP through an environment variable tied to its process id.
"""

from __future__ import annotations

import os
import re
import secrets
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


def resolve_run_name(root: str | Path, name: str | None) -> str:
    """The run folder's name inside ``root``, the same in every process of the run (module docstring)."""
    if name:
        if Path(name).name != name or name in (".", ".."):
            raise ConfigError(f"run.name must be a plain folder name, got {name!r}")
        return name
    inherited = os.environ.get(RUN_NAME_ENV, "")
    pid, _, value = inherited.partition(":")
    launched = os.environ.get("LOCAL_RANK", "0") != "0"  # Lightning's launcher sets it in its children
    if launched and value and pid.isdigit() and int(pid) == os.getppid():
        return value  # a process started by Lightning's DDP launcher: its parent chose
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
    return next_version(root)


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
