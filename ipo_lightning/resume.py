"""Exact resume: what a checkpoint needs beyond Lightning's own state, and which checkpoint to resume.

Lightning checkpoints the weights, optimizer, LR scheduler, loop progress and epoch. The training
data position is the data module's (``PreferenceDataModule.state_dict``); the random number
generators are :class:`RNGStateCheckpoint`'s. Together, stopping at any optimizer step and resuming
gives bitwise the same weights as an uninterrupted run on CPU in float32 (tested).
"""

from __future__ import annotations

import json
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from ipo_lightning.errors import ConfigError
from ipo_lightning.methods import DEFAULT_METHOD, METHOD_OPTION

HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"
"""Lightning's name for SLURM requeue checkpoints, saved in ``trainer.default_root_dir``."""


class RNGStateCheckpoint(Callback):
    """Save the Python, NumPy, torch CPU and CUDA random states in checkpoints; restore them on resume.

    Dropout draws from torch's generator, so without this a resumed run diverges from an uninterrupted
    one at the first dropout mask. The states saved are rank 0's, restored on every rank: Lightning's
    ``seed_everything`` seeds all ranks alike, so their generators advance in step.
    """

    @property
    def state_key(self) -> str:
        return "RNGStateCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def _numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    """NumPy's global state with its key array as a tensor: checkpoints load with ``weights_only``."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return (
        name,
        torch.from_numpy(keys.astype(np.int64)),
        int(position),
        int(has_gauss),
        float(cached_gaussian),
    )


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint file at ``path`` cannot be loaded, or None when it reads back intact.

    ``torch.save`` writes a zip archive with a CRC per record: reading every record checks the whole
    file (a truncated or overwritten one fails) without unpickling anything. A folder (a sharded or
    DeepSpeed checkpoint) is not checked.
    """
    path = Path(path)
    if path.is_dir():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None if bad_record is None else f"record {bad_record} fails its CRC check"


def find_resume_checkpoint(
    run_dir: str | Path, on_unreadable: Callable[[Path, str], None] | None = None
) -> Path | None:
    """The newest readable checkpoint of a run folder (requeue ones, ``checkpoints/*.ckpt``), or None.

    Every checkpoint holds the full training state at the moment it was written, so the most recently
    written one is the furthest along, whichever callback wrote it (``last.ckpt``, ``best.ckpt``,
    Lightning's ``hpc_ckpt_N.ckpt``). A newer checkpoint that does not read back (see
    :func:`checkpoint_problem`) is passed to ``on_unreadable`` with the reason and skipped.

    Raises:
        ConfigError: the folder holds checkpoints but none is readable.
    """
    run_dir = Path(run_dir)
    candidates = [*run_dir.glob(HPC_CHECKPOINT_GLOB), *run_dir.glob("checkpoints/*.ckpt")]
    candidates = [path for path in candidates if path.exists()]  # not a dangling link
    unreadable: list[Path] = []
    for path in sorted(candidates, key=lambda path: path.stat().st_mtime_ns, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        unreadable.append(path)
        if on_unreadable is not None:
            on_unreadable(path, problem)
    if unreadable:
        raise ConfigError(
            f"run folder {run_dir}: no checkpoint is readable ({', '.join(p.name for p in unreadable)}); "
            "move them away, or set --run.resume false to start over there"
        )
    return None


CONFIG_FILE = "config.yaml"
"""The resolved config a run folder was started with (written by the CLI at fit start)."""
_IGNORED_KEYS = ("ckpt_path",)
RENAMED_OPTIONS: dict[str, str] = {"model.seed": "model.sampling_seed"}
"""Options an earlier version wrote into ``config.yaml`` -> their names now, for options whose meaning
did not change: the on-policy methods' ``model.seed`` seeded the training samples exactly as
``model.sampling_seed`` does (``row_seed(seed, step, 0)`` per optimizer step)."""
ADDED_OPTIONS: dict[str, Any] = {"model.disable_dropout": False}
"""Options added since a run folder may have been started -> the value that states what runs did
before the option existed (their dropout stayed on)."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, sub in value.items():
            flat.update(_flatten(sub, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _command_line_value(value: Any) -> str:
    """``value`` as an option value is typed: ``false``, ``null``, ``0.5``, a string as it is."""
    return value if isinstance(value, str) else json.dumps(value)


def check_same_run(
    run_dir: str | Path, config: dict[str, Any], warn: Callable[[str], None] | None = None
) -> None:
    """Refuse to resume a run folder that another configuration started (one ConfigError naming the option).

    Resuming is automatic when a run folder holds checkpoints, and a folder name can repeat (two fits
    in one SLURM job both get ``slurm-<job id>``; a reused ``run.name``): resuming an IPO run's
    checkpoint into a DPO run would silently mix them. A requeued job runs the very same command.

    A folder an earlier version started is read in today's terms first: a renamed option
    (:data:`RENAMED_OPTIONS`) under its new name, with one line to ``warn``; an option it predates
    (:data:`ADDED_OPTIONS`) as the value that states what that version did. Any remaining difference,
    an option the folder's ``config.yaml`` lacks included, is refused with the value to pass.
    """
    saved_path = Path(run_dir) / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    current = _flatten(config)
    for flat in (saved, current):  # a config without ``method`` is of the default method
        flat.setdefault(METHOD_OPTION, DEFAULT_METHOD)
    renamed_from: dict[str, str] = {}
    for old, new in RENAMED_OPTIONS.items():
        if old in saved and old not in current and new not in saved:
            saved[new] = saved.pop(old)
            renamed_from[new] = old
            if warn is not None:
                warn(f"{saved_path}: {old} is now {new}; read as {new}={_command_line_value(saved[new])}")
    predates = [key for key in ADDED_OPTIONS if key not in saved and key in current]
    for key in predates:
        saved[key] = ADDED_OPTIONS[key]
    for key in sorted(saved.keys() | current.keys()):
        if key in _IGNORED_KEYS or saved.get(key) == current.get(key):
            continue
        if key in renamed_from:
            origin = f" (written as {renamed_from[key]}, its earlier name)"
        elif key in predates:
            origin = f" (its {CONFIG_FILE} predates {key}: runs then behaved as {key}={saved[key]!r})"
        elif key not in saved:
            origin = f" (its {CONFIG_FILE}, of an earlier version, has no {key})"
        else:
            origin = ""
        hint = (
            f"pass --{key} {_command_line_value(saved[key])} to resume it as it was, "
            if key in saved and not isinstance(saved[key], (dict, list))
            else ""
        )
        raise ConfigError(
            f"run folder {run_dir} holds checkpoints of a run with {key}={saved.get(key)!r}{origin}, this "
            f"run has {key}={current.get(key)!r}: {hint}use another run.name (or --run.resume false to start "
            "over there)"
        )
