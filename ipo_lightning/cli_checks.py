"""Start-up checks of CLI options that would otherwise fail mid-run with a library's traceback.

- ``model.optimizer``: the optimizer is built on one stand-in parameter, so the optimizer's own value
  checks (a negative learning rate, betas outside [0, 1)) fail before any model is loaded;
- ``ckpt_path``: the file is read the way Lightning will read it (``weights_only``: nothing in it is
  executed), so a damaged or crafted file is named in one line instead of an ``UnpicklingError``.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ipo_lightning.errors import ConfigError

# Which init arg torch's optimizer messages are about ("Invalid learning rate: -1.0").
_MESSAGE_ARGS = {
    "learning rate": "lr",
    "epsilon": "eps",
    "beta parameter": "betas",
    "weight_decay": "weight_decay",
    "momentum": "momentum",
}
# ckpt_path values that Lightning resolves itself, not file paths.
_SPECIAL_CHECKPOINTS = ("last", "best", "hpc", "registry")


def _get(config: Any, key: str) -> Any:
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)


def check_optimizer(optimizer: Any, option: str = "model.optimizer") -> None:
    """Build the optimizer of ``optimizer`` (``class_path`` + ``init_args``) on a dummy parameter.

    Raises:
        ConfigError: naming ``<option>.init_args.<arg>`` when the optimizer rejects a value.
    """
    class_path = _get(optimizer, "class_path") if optimizer is not None else None
    if not isinstance(class_path, str):
        return
    init_args = dict(vars(_get(optimizer, "init_args")) if _get(optimizer, "init_args") else {})
    module_name, _, class_name = class_path.rpartition(".")
    optimizer_class = getattr(importlib.import_module(module_name), class_name)
    try:
        optimizer_class([torch.nn.Parameter(torch.zeros(1))], **init_args)
    except ValueError as error:
        if not str(error).startswith("Invalid "):
            return  # not a value check (torch's all read "Invalid ..."): the real build reports it
        arg = next((arg for text, arg in _MESSAGE_ARGS.items() if text in str(error)), None)
        where = f"{option}.init_args.{arg}={init_args[arg]!r}" if arg in init_args else option
        raise ConfigError(f"{where}: {class_path} rejects it: {error}") from None
    except Exception:
        # A CPU stand-in parameter is not the run's (device, dtype): what fails for it alone is not
        # a bad value, and the optimizer built for the real parameters reports any real problem.
        return


def check_checkpoint_file(path: str | Path | None) -> None:
    """Fail with one line when ``ckpt_path`` names a file that is not a loadable Lightning checkpoint.

    Lightning's own names (``last``, ``best``, ...), remote URLs and checkpoint folders (DeepSpeed)
    are left to Lightning. The file is loaded as the CLI loads it for its hyperparameters, with
    ``weights_only=True`` (refusing anything but tensors and plain containers), memory-mapped so the
    tensors are not read here.

    Raises:
        ConfigError: naming the file and why it cannot be loaded.
    """
    if path is None:
        return
    text = str(path)
    if text in _SPECIAL_CHECKPOINTS or text.startswith("registry:") or "://" in text:
        return
    path = Path(text)
    if not path.exists():
        raise ConfigError(f"ckpt_path {path}: no such file")
    if path.is_dir():
        return
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # whatever a damaged file makes torch.load raise, it is the same answer
        raise ConfigError(
            f"ckpt_path {path} is not a loadable checkpoint ({_load_failure(error)}); it was read with "
            "weights_only=True, so nothing in it was executed"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(
            f"ckpt_path {path} is a torch file but not a Lightning checkpoint (no 'state_dict' entry)"
        )


def _load_failure(error: Exception) -> str:
    """The part of a ``torch.load`` error that says what was wrong with the file."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, pickle.UnpicklingError):
        # Drop torch's advice to retry with weights_only=False: that would run the file's code.
        lines = [
            line.removeprefix(
                "Please file an issue with the following so that we can make `weights_only=True` "
                "compatible with your use case: WeightsUnpickler error:"
            ).strip()
            for line in lines[1:]
            if not line.startswith("Check the documentation")
        ]
        lines = [line for line in lines if line]
    reason = "; ".join(lines) or "unreadable"
    return f"{type(error).__name__}: {reason}"
