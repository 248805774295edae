"""The command line: ``python -m ipo_lightning {fit,validate,test} --config X.yaml``.

A thin :class:`~lightning.pytorch.cli.LightningCLI` subclass. What it adds to the stock CLI:

- ``--method``: which LightningModule and data module it builds (:mod:`~ipo_lightning.methods`;
  default ``preference``, IPO/DPO), with flat ``model:`` and ``data:`` sections for every method;
- model and data share one setting for the tokenizer and the maximum length (``link_arguments``);
- ``--wandb.*`` options and default loggers: unless ``trainer.logger`` is set, every run writes a CSV
  copy of all metrics and a W&B run (offline when not logged in) into one run directory,
  ``<trainer.default_root_dir>/<run name>``, beside its checkpoints, resolved config and export;
- ``--run.*``: the run folder's name, decided once for all processes (``version_N``, ``slurm-<job
  id>``, or ``run.name``) and reserved atomically, and resuming from the newest readable checkpoint
  in it, ``metrics.csv`` continued (:mod:`~ipo_lightning.metrics_history`); a run folder this start
  created is removed again when the run stops before it started (a start-up check failed);
- checkpoints written atomically (:class:`~ipo_lightning.checkpoint_io.AtomicCheckpointIO`);
- ``--slurm.*``: auto-requeue of SLURM jobs at a step boundary (:class:`SlurmRequeue`);
- random states in every checkpoint (:class:`RNGStateCheckpoint`) for an exact resume;
- ``--export.*``: the trained policy saved in Hugging Face format at the end of ``fit``;
- ``--divergence.*``: KL to the reference on held-out pairs, every N steps and after validations;
- ``--generation.*``: reward of the policy's samples, win rate over the reference's (:class:`GenerationEval`);
- ``--kl_budget.*``: warn, or checkpoint and stop, when that KL exceeds a budget;
- ``--nonfinite.*``: a non-finite loss, gradient or weight stops the run (or its step is skipped), and
  a loss jump is warned about (:class:`NonFiniteGuard`); a stopped run exits with code 1;
- user errors (bad data, bad config values, an option's value of the wrong type, a ``ckpt_path``
  that is no checkpoint) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import netrc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ipo_lightning.callbacks import DivergenceMonitor, GenerationEval, HFExport, KLBudget
from ipo_lightning.callbacks.nonfinite import NonFiniteGuard
from ipo_lightning.callbacks.performance import StepPerformance
from ipo_lightning.callbacks.slurm import SlurmRequeue
from ipo_lightning.checkpoint_io import AtomicCheckpointIO
from ipo_lightning.cli_checks import check_checkpoint_file, check_optimizer
from ipo_lightning.cli_errors import OneLineErrorParser
from ipo_lightning.distributed import check_lora_strategy, check_strategy

# The entry point lives in ipo_lightning.entry, so that the tools start without Lightning; these names
# stay importable from here.
from ipo_lightning.entry import TOOLS, main  # noqa: F401
from ipo_lightning.errors import ConfigError
from ipo_lightning.methods import DEFAULT_METHOD, METHOD_OPTION, METHODS, Method, method_from_argv
from ipo_lightning.metrics_history import HistoryCSVLogger, MetricsHistory
from ipo_lightning.module import DEFAULT_LR
from ipo_lightning.resume import RNGStateCheckpoint, check_same_run, find_resume_checkpoint
from ipo_lightning.run_folder import (
    RunFolder,
    discard_run_folder,
    reserve_run_folder,
    save_wandb_run_id,
    share_run_name,
    wandb_run_id,
)

DEFAULT_ROOT_DIR = "runs"


@dataclass
class WandbOptions:
    """Weights & Biases tracking for the default loggers (ignored when ``trainer.logger`` is set).

    Args:
        enabled: Log to W&B besides the CSV file.
        project: W&B project name.
        name: Run name shown in W&B; default: W&B picks one.
        entity: W&B team or user; default: your default entity.
        tags: Tags attached to the run.
        mode: ``auto``: $WANDB_MODE if set, else online when logged in (API key) and offline otherwise.
    """

    enabled: bool = True
    project: str = "ipo-lightning"
    name: str | None = None
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class RunOptions:
    """The run folder ``<trainer.default_root_dir>/<name>`` of the default loggers.

    Args:
        name: Folder name; default: the next ``version_N``, or ``slurm-<job id>`` in a SLURM job (so a
            requeued job continues in the same folder). Reusing a name continues that run.
        resume: Continue from the run folder's newest checkpoint when it has one and ``ckpt_path`` is
            not set; the W&B run continues too (its id is kept in the folder).
    """

    name: str | None = None
    resume: bool = True


class SaveAndLogConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run folder and send it to W&B as well.

    W&B then shows every option of the run (optimizer, precision, accumulation, seed, data), not only
    the module's and data module's hyperparameters. Saving waits until every ``setup`` hook has run
    (the module checks the data against the loss there), so a run stopped by a start-up check leaves
    no run folder behind.
    """

    started = False
    """Set once start-up is over (every setup hook ran): from here on the run folder holds a run."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stage = stage

    def _save_once(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = True
        super().setup(trainer, pl_module, self._stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if wandb_loggers and wandb_loggers[0].save_dir:
            # Kept beside the checkpoints so a resumed (e.g. requeued) run logs into the same W&B run.
            # (Not trainer.log_dir: it broadcasts, and this runs on rank 0 only.)
            save_wandb_run_id(wandb_loggers[0].save_dir, str(wandb_loggers[0].version))
        if wandb_loggers:
            resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in wandb_loggers:
                logger.experiment.config.update({"cli": resolved}, allow_val_change=True)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """The W&B mode a run will use: an explicit mode, else ``$WANDB_MODE``, else by login state."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _wandb_logged_in() else "offline"


def build_default_loggers(folder: RunFolder, options: WandbOptions) -> list[Logger]:
    """CSV (always) and W&B (unless disabled) loggers sharing one run folder.

    The folder comes from :func:`~ipo_lightning.run_folder.reserve_run_folder` (one decision for all
    processes). The CSV logger continues a resumed run's ``metrics.csv``. The W&B run id is read from
    the folder when it holds one, so a resumed run continues the same W&B run (``resume="allow"``);
    only rank 0 ever opens the W&B run.
    """
    csv_logger = HistoryCSVLogger(save_dir=str(folder.path.parent), name="", version=folder.name)
    loggers: list[Logger] = [csv_logger]
    mode = resolve_wandb_mode(options.mode)
    if options.enabled and mode != "disabled":
        if mode == "offline" and options.mode == "auto" and not os.environ.get("WANDB_MODE"):
            rank_zero_info("W&B: not logged in, logging offline (sync later with `wandb sync`).")
        loggers.append(
            WandbLogger(
                save_dir=csv_logger.log_dir,
                offline=mode == "offline",
                project=options.project,
                name=options.name,
                entity=options.entity,
                tags=options.tags or None,
                id=wandb_run_id(csv_logger.log_dir) if getattr(rank_zero_only, "rank", 0) == 0 else None,
                resume="allow",
            )
        )
    return loggers


class PreferenceCLI(LightningCLI):
    """LightningCLI for one :class:`~ipo_lightning.methods.Method`'s module and data module.

    Args:
        args: the command line (default: ``sys.argv[1:]``).
        run: run the subcommand.
        method: the method whose classes are built; default: the one ``args`` selects
            (:func:`~ipo_lightning.methods.method_from_argv`).
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, method: str | None = None) -> None:
        argv = sys.argv[1:] if args is None else list(args)
        self.method: Method = METHODS[method or method_from_argv(argv)]
        super().__init__(
            self.method.module_class,
            self.method.datamodule_class,
            args=args,
            run=run,
            # Lightning's own default is 1000 epochs, which a forgotten max_epochs turns into days.
            trainer_defaults={"default_root_dir": DEFAULT_ROOT_DIR, "max_epochs": 1},
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_class=OneLineErrorParser,
            parser_kwargs={
                "prog": "python -m ipo_lightning",
                "description": "IPO / DPO preference fine-tuning of Hugging Face causal LMs, and a "
                "reward-model baseline (--method). Also: "
                "compare (several methods, one budget), report (Markdown + plots from run folders), "
                "judge (win rate under a reward), evaluate (reward of a run's samples); see "
                "`python -m ipo_lightning report --help`.",
            },
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (there is no ``predict`` for preference pairs)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Read before the parser exists (it picks the classes); declared here so it is validated,
        # listed in --help and saved in config.yaml.
        parser.add_argument(
            f"--{METHOD_OPTION}",
            type=Literal[tuple(METHODS)],  # type: ignore[valid-type]
            default=self.method.name,
            help="training method; the model and data options below are this method's. "
            + "; ".join(f"{name}: {METHODS.description(name)}" for name in METHODS),
        )
        # One tokenizer and one length budget for model and data: set them once.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("data.max_length", "model.max_length")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(DivergenceMonitor, "divergence")
        parser.add_lightning_class_args(KLBudget, "kl_budget")  # after the monitor: it checks its values
        parser.add_lightning_class_args(GenerationEval, "generation")
        parser.add_lightning_class_args(SlurmRequeue, "slurm")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_class_arguments(WandbOptions, "wandb", fail_untyped=True, sub_configs=True)
        parser.add_class_arguments(RunOptions, "run", fail_untyped=True, sub_configs=True)
        parser.set_defaults(
            {
                "model.optimizer": {
                    "class_path": "torch.optim.AdamW",
                    "init_args": {"lr": DEFAULT_LR, "weight_decay": 0.0},
                }
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Check a given ``ckpt_path`` first: Lightning reads it right away, for the hyperparameters in it."""
        if self.config.get("subcommand"):
            check_checkpoint_file(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Resolve defaults that depend on other options (the method's ``resolve``), so the saved
        config states them; the parsed ``method`` must be the one the classes were chosen for."""
        config = self.config.get(str(self.subcommand), self.config)
        parsed = config.get(METHOD_OPTION, DEFAULT_METHOD)
        if parsed != self.method.name:
            raise ConfigError(
                f"method: the command line selects {self.method.name!r} (--method or a --config file's "
                f"method:) but the parsed config says {parsed!r}; give the method with --method or as "
                "a top-level method: key of a --config file"
            )
        check_lora_strategy(config.trainer.strategy, config.model.get("lora"))
        check_strategy(config.trainer.strategy)
        check_optimizer(config.model.get("optimizer"))
        if self.method.resolve is not None:
            self.method.resolve(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The stock trainer, plus the default loggers, random states in checkpoints and SLURM set-up.

        With the default loggers, ``default_root_dir`` becomes the run folder, so everything Lightning
        writes there by itself (SLURM requeue checkpoints) belongs to this run only.
        """
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if not any(isinstance(callback, RNGStateCheckpoint) for callback in callbacks):
            callbacks.append(RNGStateCheckpoint())
        if not any(isinstance(callback, StepPerformance) for callback in callbacks):
            callbacks.append(StepPerformance())
        kwargs["callbacks"] = callbacks
        kwargs["plugins"] = _plugins(trainer_config.get("plugins"), trainer_config.get("strategy"))
        self.run_dir: Path | None = None
        self.run_folder: RunFolder | None = None
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or DEFAULT_ROOT_DIR
            run = self._get(self.config_init, "run")
            self.run_folder = reserve_run_folder(root, run.name)
            share_run_name(self.run_folder.name)
            kwargs["logger"] = build_default_loggers(self.run_folder, self._get(self.config_init, "wandb"))
            callbacks.append(MetricsHistory())
            self.run_dir = self.run_folder.path
            kwargs["default_root_dir"] = str(self.run_dir)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except BaseException:
            self._discard_unstarted_run_folder(None)
            raise
        # The step timer comes first, so a step's time ends before the measurements of the later
        # on_train_batch_end hooks (divergence monitor, generation evaluation) start. Then the guard's
        # checks run before any other callback sees the step (a monitor measuring NaN weights, a
        # checkpoint saving them); Lightning runs checkpoint callbacks last anyway.
        trainer.callbacks.sort(
            key=lambda callback: (
                not isinstance(callback, StepPerformance),
                not isinstance(callback, NonFiniteGuard),
            )
        )
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; a run stopped before it started leaves no run folder behind, and the
        W&B run it logged to ends with it."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._discard_unstarted_run_folder(self.trainer)
            _finish_wandb_runs(self.trainer, exit_code=1)
            raise
        _finish_wandb_runs(self.trainer, exit_code=0)

    def _discard_unstarted_run_folder(self, trainer: Trainer | None) -> None:
        """Remove the run folder this start created if start-up never completed (rank 0 only)."""
        folder = getattr(self, "run_folder", None)
        if folder is None or getattr(rank_zero_only, "rank", 0) != 0:
            return
        if trainer is not None:
            # Without the config callback (fast_dev_run) there is no telling: the folder is kept.
            configs = [callback for callback in trainer.callbacks if isinstance(callback, SaveAndLogConfig)]
            if not configs or any(callback.started for callback in configs):
                return
        _finish_wandb_runs(trainer, exit_code=1)  # W&B stops writing into the folder first
        discard_run_folder(folder)

    def before_fit(self) -> None:
        """Resume from the run folder's newest checkpoint (``run.resume``) unless ``ckpt_path`` is set."""
        config = self.config_init["fit"]
        run = self._get(self.config_init, "run")
        if config.get("ckpt_path") is None and run.resume and self.run_dir is not None:
            checkpoint = find_resume_checkpoint(self.run_dir, on_unreadable=_warn_unreadable)
            if checkpoint is not None:
                current = yaml.safe_load(self._parser("fit").dump(self.config["fit"], skip_none=False))
                check_same_run(self.run_dir, current, warn=_warn)
                rank_zero_info(f"Resuming from {checkpoint} (run.resume; --run.resume false starts over)")
                config["ckpt_path"] = str(checkpoint)


def _finish_wandb_runs(trainer: Trainer | None, exit_code: int) -> None:
    """End the W&B runs of ``trainer``'s loggers that started. A process's exit would end them too;
    ending them here writes their last records before ``main`` returns, and a second ``main`` in the
    same process (a notebook, a test) starts its own run instead of joining this one (Lightning's
    WandbLogger adopts any W&B run in progress)."""
    for logger in trainer.loggers if trainer is not None else []:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish(exit_code=exit_code)


@rank_zero_only
def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@rank_zero_only
def _warn_unreadable(path: Path, problem: str) -> None:
    print(f"warning: checkpoint {path} is unreadable ({problem}); trying an older one", file=sys.stderr)


def _plugins(plugins: Any, strategy: Any) -> list[Any]:
    """``plugins`` with atomic checkpoint writes, and under SLURM a ``SLURMEnvironment`` whose own
    requeue handler is off (see SlurmRequeue); a checkpoint IO or cluster environment given is kept."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    own_io = getattr(strategy, "_checkpoint_io", None) is not None  # a strategy instance may bring one
    if not own_io and not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect() and not any(isinstance(plugin, ClusterEnvironment) for plugin in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins
