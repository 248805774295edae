"""Study axes of a compare file: every member at every point of declared data sizes, noise levels, seeds.

A compare file's ``study:`` maps each axis to its values::

    study:
      data.train_size: [250, 1000, 4000]   # the first N pairs of one fixed shuffle (nested sets)
      data.label_noise: [0, 0.2]           # the share of those N pairs whose labels are flipped
      seed: [0, 1]                         # replicates

Every member runs at every combination (members x axis values, in file order), as a run named
``<member>-n250-noise0.2-seed1``. Only the axes' options differ between runs; everything else
stays locked as between members. A replicate (``seed: k``) sets both ``seed_everything`` (weight
initialisation of new parameters, dropout) and ``data.seed`` (the training order, which pairs
``data.label_noise`` flips, and the ``data.val_fraction`` split): a pretrained model trained
without dropout would otherwise repeat the same run exactly. The ``data.train_size`` order does
not follow either seed, so every replicate and size trains on a prefix of the same order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipo_lightning.data.noise import check_label_noise
from ipo_lightning.data.subset import check_train_size
from ipo_lightning.errors import ConfigError


def _check_size(value: Any) -> None:
    check_train_size(value)
    if value is None:
        raise ConfigError("data.train_size must be a positive number of pairs, got None")


def _check_noise(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"data.label_noise must be a number, got {value!r}")
    check_label_noise(float(value))


def _check_seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"seed must be an integer, got {value!r}")


@dataclass(frozen=True)
class Axis:
    """One kind of study axis: the options a value sets and how run names show it."""

    key: str
    """Name in the compare file's ``study:``."""
    options: tuple[str, ...]
    """Dotted fit options each value is given to."""
    prefix: str
    """Run name part: ``<prefix><value>``."""
    check: Callable[[Any], None]
    """Raises a ConfigError for a value that can never work."""


AXES = {
    axis.key: axis
    for axis in (
        Axis("data.train_size", ("data.train_size",), "n", _check_size),
        Axis("data.label_noise", ("data.label_noise",), "noise", _check_noise),
        Axis("seed", ("seed_everything", "data.seed"), "seed", _check_seed),
    )
}
"""The axes a study may declare, by their ``study:`` key."""


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: a member, at one point of the study's axes (none without a study)."""

    name: str
    member: str
    point: dict[str, Any]
    """Axis key -> value, in the study's axis order."""

    def axis_options(self) -> dict[str, Any]:
        """The dotted fit options the point sets (``seed: 1`` sets ``seed_everything`` and ``data.seed``)."""
        return {option: value for key, value in self.point.items() for option in AXES[key].options}


def check_study(path: Path, raw: object) -> dict[str, list[Any]]:
    """The validated ``study:`` mapping of the compare file at ``path`` (empty when absent).

    Raises:
        ConfigError: an unknown axis, an axis without values, a repeated value or a value that can
            never work; the message names the file and the axis.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: 'study' maps each axis ({', '.join(AXES)}) to a list of values")
    study: dict[str, list[Any]] = {}
    for key, values in raw.items():
        if key not in AXES:
            raise ConfigError(f"{path}: study axis {key!r} is not one of {', '.join(AXES)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: study axis {key!r} needs a non-empty list of values")
        for value in values:
            try:
                AXES[key].check(value)
            except ConfigError as error:
                raise ConfigError(f"{path}: study axis {key!r}: {error}") from None
        names = [_value_name(value) for value in values]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: study axis {key!r} repeats a value: {values}")
        study[key] = list(values)
    return study


def axis_options(study: Mapping[str, list[Any]]) -> dict[str, str]:
    """Dotted option -> the axis key that sets it, for every axis of ``study``."""
    return {option: key for key in study for option in AXES[key].options}


def plan_runs(members: Mapping[str, Any], study: Mapping[str, list[Any]]) -> list[PlannedRun]:
    """Every member at every point of ``study``: members outer, then the axes in file order.

    Without a study each member is one run of the member's own name.
    """
    points = [dict(zip(study, values, strict=True)) for values in itertools.product(*study.values())]
    return [
        PlannedRun(
            name="-".join([member, *(f"{AXES[key].prefix}{_value_name(v)}" for key, v in point.items())]),
            member=member,
            point=point,
        )
        for member in members
        for point in points
    ]


def _value_name(value: Any) -> str:
    """A value as run names show it: ``0.2``, ``0``, ``1000``."""
    return f"{value:g}" if isinstance(value, float) else str(value)
