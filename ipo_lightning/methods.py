"""Training methods: which LightningModule and LightningDataModule ``python -m ipo_lightning`` builds.

The top-level option ``method`` (``--method X`` or ``method: X`` in a config file, default
``preference``) picks a :class:`Method`. The ``model:`` and ``data:`` sections stay flat (no
``class_path``): they hold the chosen classes' arguments, so the saved ``config.yaml`` keeps one layout
for every method and states the method beside them.

The classes have to be known before the parser is built (its options are their arguments), so the
CLI reads the method from the command line first (:func:`method_from_argv`), then builds the parser
for that method, and the parsed ``method`` value is checked against that first reading.

Methods register lazily (:meth:`MethodRegistry.register` takes a loader), so importing the CLI
imports no method's module until that method is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ipo_lightning.errors import ConfigError

if TYPE_CHECKING:
    # Types only: a method's classes import Lightning when it is loaded, not this registry.
    from jsonargparse import Namespace
    from lightning.pytorch import LightningDataModule, LightningModule

DEFAULT_METHOD = "preference"
METHOD_OPTION = "method"
PAIR_COMPLETIONS = 2
"""Completions per example of the methods trained on preference pairs (chosen and rejected)."""


@dataclass(frozen=True)
class Method:
    """One training method: the classes the CLI builds and how it fills dependent defaults.

    Attributes:
        name: The ``method`` value that selects it.
        module_class: The LightningModule; its arguments are the ``model:`` section.
        datamodule_class: The LightningDataModule; its arguments are the ``data:`` section.
        description: One line, shown in ``--help``.
        resolve: Fills defaults that depend on other options in the subcommand's parsed config,
            before the classes are built, so the saved ``config.yaml`` states the values used;
            None: nothing to resolve.
        completions_per_example: The completions one training example (a pair or a prompt) puts
            through an optimizer step, from the ``model:`` section (a mapping; options it does not
            set take the module's defaults): 2 for a preference pair, k for k samples per prompt.
            It turns a budget of samples into optimizer steps (``compare``'s ``budget:``).
    """

    name: str
    module_class: type[LightningModule]
    datamodule_class: type[LightningDataModule]
    description: str
    resolve: Callable[[Namespace], None] | None = None
    completions_per_example: Callable[[Mapping[str, Any]], int] = lambda model: PAIR_COMPLETIONS


class MethodRegistry(Mapping[str, Method]):
    """The known methods by name; each is built by its loader on first access (one import then)."""

    def __init__(self) -> None:
        self._loaders: dict[str, Callable[[], Method]] = {}
        self._descriptions: dict[str, str] = {}
        self._loaded: dict[str, Method] = {}

    def register(self, name: str, description: str, loader: Callable[[], Method]) -> None:
        """Add method ``name``; ``loader`` imports its classes and returns its :class:`Method`."""
        if name in self._loaders:
            raise ValueError(f"method {name!r} is registered already")
        self._loaders[name] = loader
        self._descriptions[name] = description

    def description(self, name: str) -> str:
        """The one-line description of ``name``, without loading the method."""
        return self._descriptions[name]

    def __getitem__(self, name: str) -> Method:
        if name not in self._loaded:
            method = self._loaders[name]()
            if method.name != name:
                raise ValueError(f"the loader of method {name!r} returned method {method.name!r}")
            self._loaded[name] = method
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


METHODS = MethodRegistry()
"""Every method ``--method`` accepts, in the order ``--help`` lists them."""


def check_method(name: Any, where: str) -> str:
    """``name`` if it is a registered method, else a ConfigError naming ``where`` and the choices."""
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{where}: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return name


def method_from_argv(argv: list[str]) -> str:
    """The method a command line selects: ``--method X``, ``--method=X``, or ``method: X`` in a
    ``--config`` file; the last one wins, as the parser applies them in order. Default: ``preference``.

    A config file that cannot be read is left to the parser (it reports it with the option); only its
    top-level ``method`` key is read here.

    Raises:
        ConfigError: an unknown method name (the message names where it came from and the choices).
    """
    method, where = DEFAULT_METHOD, None
    index = 0
    while index < len(argv):
        arg = argv[index]
        value: str | None = None
        key, equals, inline = arg.partition("=")
        if key in ("--method", "--config") and not equals and index + 1 < len(argv):
            value = argv[index + 1]
            index += 1
        elif key in ("--method", "--config") and equals:
            value = inline
        if value is not None and key == "--method":
            method, where = value, f"--method {value}"
        elif value is not None and key == "--config":
            found = _config_method(value)
            if found is not None:
                method, where = found, f"{value}: method"
        index += 1
    if where is not None:
        check_method(method, where)
    return method


def _config_method(path: str) -> Any:
    """The top-level ``method`` of config file ``path``; None when it has none or cannot be read."""
    file = Path(path).expanduser()
    if not file.is_file():
        return None
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config.get(METHOD_OPTION) if isinstance(config, dict) else None


# ---------------------------------------------------------------------- the methods


def _preference() -> Method:
    from ipo_lightning.data import PreferenceDataModule
    from ipo_lightning.module import PreferenceModule, resolve_preference_options

    return Method(
        name="preference",
        module_class=PreferenceModule,
        datamodule_class=PreferenceDataModule,
        description=METHODS.description("preference"),
        resolve=resolve_preference_options,
    )


def _reward_model() -> Method:
    from ipo_lightning.data import PreferenceDataModule
    from ipo_lightning.reward_model import RewardModelModule, resolve_reward_model_options

    return Method(
        name="reward_model",
        module_class=RewardModelModule,
        datamodule_class=PreferenceDataModule,
        description=METHODS.description("reward_model"),
        resolve=resolve_reward_model_options,
    )


METHODS.register(
    "preference", "IPO / DPO / hinge on preference pairs against a frozen reference", _preference
)
METHODS.register(
    "reward_model",
    "a Bradley-Terry reward model (sequence classification, one score) on the same preference pairs",
    _reward_model,
)


def _on_policy(name: str) -> Method:
    from ipo_lightning.rl.data import PromptDataModule
    from ipo_lightning.rl.module import resolve_on_policy_options
    from ipo_lightning.rl.online import ONLINE_SAMPLES, OnlineModule
    from ipo_lightning.rl.rloo import RLOO_DEFAULT_SAMPLES, RLOOModule

    module_class = {"rloo": RLOOModule, "online": OnlineModule}[name]
    completions: Callable[[Mapping[str, Any]], int] = {
        "rloo": lambda model: int(model.get("samples_per_prompt", RLOO_DEFAULT_SAMPLES)),
        "online": lambda model: ONLINE_SAMPLES,
    }[name]
    return Method(
        name=name,
        module_class=module_class,
        datamodule_class=PromptDataModule,
        description=METHODS.description(name),
        resolve=resolve_on_policy_options,
        completions_per_example=completions,
    )


METHODS.register(
    "rloo",
    "RLOO on prompts: k policy samples per prompt, a reward, leave-one-out baseline, KL penalty",
    lambda: _on_policy("rloo"),
)
METHODS.register(
    "online",
    "online IPO / DPO on prompts: two policy samples per prompt labelled by a reward",
    lambda: _on_policy("online"),
)
