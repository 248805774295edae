"""A compare file's ``budget:``: the same optimizer steps, or the same training samples, for every run.

``budget: {steps: N}`` gives every run ``N`` optimizer steps; ``budget: {samples: N}`` gives every run
``N // samples_per_step`` steps, where one optimizer step of a run puts

    data.batch_size x trainer.accumulate_grad_batches x devices x trainer.num_nodes x completions per example

completions through the loss (:attr:`~ipo_lightning.methods.Method.completions_per_example`: 2 for a
preference pair, k for RLOO's k samples per prompt). So members of different methods, or with
different batch sizes, train on the same number of completions.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ipo_lightning.errors import ConfigError
from ipo_lightning.methods import DEFAULT_METHOD, METHODS, check_method

BUDGET_KEYS = ("steps", "samples")
TRAINER_DEFAULTS = {"accumulate_grad_batches": 1, "devices": "auto", "num_nodes": 1}
"""Lightning Trainer defaults of the options a step's size depends on."""


@dataclass(frozen=True)
class Budget:
    """The validated ``budget:`` of a compare file: ``amount`` optimizer steps or training samples."""

    kind: str
    """``steps`` or ``samples``."""
    amount: int

    def max_steps(self, step: StepSize) -> int:
        """Optimizer steps a run whose steps have the size ``step`` gets (0 when one step is too big)."""
        return self.amount if self.kind == "steps" else self.amount // step.samples


@dataclass(frozen=True)
class StepSize:
    """What one optimizer step of a run trains on; ``samples`` is their product."""

    method: str
    batch_size: int
    accumulate_grad_batches: int
    devices: int
    num_nodes: int
    completions_per_example: int

    @property
    def samples(self) -> int:
        """Completions per optimizer step."""
        return (
            self.batch_size
            * self.accumulate_grad_batches
            * self.devices
            * self.num_nodes
            * self.completions_per_example
        )

    def describe(self) -> str:
        """The product spelled out, e.g. ``data.batch_size 16 x accumulate_grad_batches 1 x 1 device(s) x 1
        node(s) x 4 completions per example (rloo) = 64 samples``."""
        return (
            f"data.batch_size {self.batch_size} x accumulate_grad_batches {self.accumulate_grad_batches} "
            f"x {self.devices} device(s) x {self.num_nodes} node(s) x {self.completions_per_example} "
            f"completions per example ({self.method}) = {self.samples} samples"
        )


def check_budget(path: Path, raw: object) -> Budget | None:
    """The validated ``budget:`` of the compare file at ``path`` (None when absent).

    Raises:
        ConfigError: not a mapping, an unknown key, both or neither of ``steps`` and ``samples``, or a
            value that is not a positive integer; the message names the file and the key.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: 'budget' is {{steps: N}} or {{samples: N}}")
    unknown = sorted(str(key) for key in raw if key not in BUDGET_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown budget key(s) {unknown}; use steps or samples")
    if len(raw) != 1:
        raise ConfigError(f"{path}: budget sets both steps and samples; give one of them")
    ((kind, amount),) = raw.items()
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        raise ConfigError(f"{path}: budget {kind} must be a positive integer, got {amount!r}")
    return Budget(kind, amount)


def step_size(config: Mapping[str, Any], where: str) -> StepSize:
    """The size of one optimizer step of the run that ``config`` (a fit config as a mapping) describes.

    Options the config does not set take their defaults: the method's data module's ``batch_size``,
    the Trainer's ``accumulate_grad_batches`` and ``num_nodes``.

    Raises:
        ConfigError: an unknown method, or a device count that only the machine decides
            (``trainer.devices`` ``auto`` or ``-1`` on an accelerator other than the CPU); the message
            starts with ``where``.
    """
    method_name = check_method(config.get("method") or DEFAULT_METHOD, f"{where}: method")
    method = METHODS[method_name]
    data = _section(config, "data")
    trainer = {**TRAINER_DEFAULTS, **_section(config, "trainer")}
    batch_size = data.get("batch_size")
    if batch_size is None:
        batch_size = inspect.signature(method.datamodule_class).parameters["batch_size"].default
    return StepSize(
        method=method_name,
        batch_size=int(batch_size),
        accumulate_grad_batches=int(trainer["accumulate_grad_batches"] or 1),
        devices=device_count(trainer["devices"], trainer.get("accelerator"), where),
        num_nodes=int(trainer["num_nodes"] or 1),
        completions_per_example=method.completions_per_example(_section(config, "model")),
    )


def device_count(devices: Any, accelerator: Any, where: str) -> int:
    """The number of devices ``trainer.devices`` names (a count, a list or a comma list of ids).

    ``auto`` on the CPU is one process; elsewhere ``auto`` and ``-1`` mean every device of the
    machine, which the config alone does not tell.
    """
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        parts = [part for part in devices.split(",") if part.strip()]
        devices = int(parts[0]) if len(parts) == 1 and "," not in devices else parts
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if devices in ("auto", None) and accelerator == "cpu":
        return 1
    raise ConfigError(
        f"{where}: trainer.devices {devices!r} leaves the number of devices to the machine; a budget needs "
        "it to count samples per step, so set trainer.devices to a number"
    )


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name)
    return value if isinstance(value, Mapping) else {}


def layered_config(files: Iterable[Path], *option_sets: Mapping[str, Any]) -> dict[str, Any]:
    """The config a fit command line builds, read from its files and options without the parser.

    ``files`` are ``--config`` files, applied in order; then each mapping of options (dotted names,
    mappings under a key, a ``config`` file) on top. Unset options are absent: :func:`step_size`
    fills their defaults. Used to plan a budget before anything runs; the resolved configs
    (``fit --print_config``) are then checked against the plan.
    """
    config: dict[str, Any] = {}
    for file in files:
        _merge(config, _read_yaml(Path(file)))
    for options in option_sets:
        for key, value in options.items():
            if key == "config" and isinstance(value, str):
                _merge(config, _read_yaml(Path(value).expanduser()))
                continue
            *parents, leaf = str(key).split(".")
            node = config
            for parent in parents:
                child = node.get(parent)
                node[parent] = child = child if isinstance(child, dict) else {}
                node = child
            if isinstance(value, dict) and isinstance(node.get(leaf), dict):
                _merge(node[leaf], value)
            else:
                node[leaf] = value
    return config


def _read_yaml(file: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(file.read_text(encoding="utf-8")) if file.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
