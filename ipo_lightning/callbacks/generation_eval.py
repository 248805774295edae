"""Judge what the policy generates while training runs: reward of its samples and win rate over the reference.

On by setting ``generation.reward`` (a ``module:function``, ``builtin:gold`` or a reward model; see
:func:`ipo_lightning.rewards.load_reward`). For the first ``prompts`` distinct prompts of each held-out
set (every validation set by default; the training set when there is none) the policy samples
``samples_per_prompt`` completions per prompt (ancestral, temperature 1) and, with ``greedy``, one
greedy completion; the reward scores them. The reference's samples of the same prompts, with the same
per-sample seeds, are generated and scored once per run, at the first measurement, and kept in memory;
a resumed run regenerates them (the same seeds give the same samples). Metrics
(:mod:`ipo_lightning.generation_metrics`) are logged as ``gen/<metric>`` for the primary set and, with
several sets, ``gen/<set>/<metric>`` for each, at the exact optimizer step (``Logger.log_metrics``) and
into ``trainer.callback_metrics``.

``gen/kl`` is the sampled sequence KL(pi || ref) of the policy's own samples: each is scored
teacher-forced under the policy and under the reference (the frozen model, the LoRA policy with its
adapters off, or with ``model.reference=precomputed`` the reference loaded at the first measurement
and kept in CPU memory for the run, on the device only while a measurement runs) through the
divergence monitor's scoring path (:func:`ipo_lightning.evaluation.sample_logprobs`), and
``log pi(y|x) - log ref(y|x)`` (``policy_logratio`` in the samples file) is averaged.

The schedule is the divergence monitor's (:mod:`ipo_lightning.callbacks.schedule`: step 0, every
``every_n_steps`` optimizer steps, after every validation), so ``gen/`` and ``divergence/`` rows share
steps. Every sample lands in ``generation_samples.jsonl`` in the run folder (and a ``gen/samples`` W&B
table); a resumed run first cuts the file back to its checkpoint's step
(:mod:`~ipo_lightning.callbacks.samples_file`).

At ``setup`` the reward is loaded and called once on the first two held-out prompts and their chosen
completions, so a reward that cannot be imported, called or that returns the wrong number of values or a
non-finite one stops the run before training, with one line (exit code 2).

Under DDP each process judges every ``world``-th prompt of each set (the per-prompt seeds make the
samples independent of the split) and the parts are gathered; rank 0 logs and writes. Under FSDP the
policy's full weights are gathered once per measurement
(:func:`~ipo_lightning.distributed.full_weights_for_local_forwards`), so each rank generates on its
own and the numbers are one process's. Under DeepSpeed ZeRO-3 (sharded weights, where ranks would run
different numbers of collective forwards) the evaluation is off, with a warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn

from ipo_lightning.batching import single_row_layout
from ipo_lightning.callbacks.divergence_monitor import DivergenceMonitor
from ipo_lightning.callbacks.samples_file import SamplesFile
from ipo_lightning.callbacks.schedule import DEFAULT_EVERY_N_STEPS, MeasurementSchedule
from ipo_lightning.data.prompts import HeldOutPrompt, held_out_prompts, reward_conversations
from ipo_lightning.distributed import full_weights_for_local_forwards
from ipo_lightning.errors import ConfigError
from ipo_lightning.eval_options import DEFAULT_PROMPTS, EvalOptions
from ipo_lightning.evaluation import (
    PromptResult,
    SetResult,
    judge_prompts,
    merge,
    metric_names,
    sample_logprobs,
    set_result,
    share,
    with_log_ratios,
)
from ipo_lightning.rewards import RewardError, RewardFunction, load_reward

PREFIX = "gen/"
OPTION = "--generation.reward"
STEP_KEY = PREFIX + "step"
"""``trainer.callback_metrics`` key of the optimizer step of the latest measurement (not logged)."""
_DEFAULTS = EvalOptions()


class GenerationEval(Callback):
    """Log the reward of the policy's samples and its win rate over the reference (module docstring).

    Args:
        reward: reward spec (``module:function``, ``builtin:gold``, reward model folder or hub id); null: off.
        prompts: held-out prompts judged per set (the first N distinct prompts).
        samples_per_prompt: sampled completions per prompt, for policy and reference alike (k).
        greedy: also one greedy policy completion per prompt (``gen/greedy_reward``).
        max_new_tokens: longest completion.
        batch_size: rows (prompt x sample) per generate call.
        every_n_steps: measure every N optimizer steps (0: only at step 0 and after validations); null:
            the divergence monitor's ``every_n_steps``.
        on_validation: also measure after every validation run.
        sets: validation sets to draw prompts from (null: all; the training set when there is none).
        samples_file: JSONL file in the run folder collecting every sample of every measurement; empty: none.
        seed: base seed of the per-sample generators.
    """

    def __init__(
        self,
        reward: str | None = None,
        prompts: int = DEFAULT_PROMPTS,
        samples_per_prompt: int = _DEFAULTS.samples_per_prompt,
        greedy: bool = _DEFAULTS.greedy,
        max_new_tokens: int = _DEFAULTS.max_new_tokens,
        batch_size: int = _DEFAULTS.batch_size,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        sets: list[str] | None = None,
        samples_file: str = "generation_samples.jsonl",
        seed: int = _DEFAULTS.seed,
    ) -> None:
        super().__init__()
        if prompts < 1 or samples_per_prompt < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ConfigError(
                "generation: prompts, samples_per_prompt, max_new_tokens and batch_size must be >= 1; got "
                f"{prompts}, {samples_per_prompt}, {max_new_tokens}, {batch_size}"
            )
        if every_n_steps is not None and every_n_steps < 0:
            raise ConfigError(f"generation.every_n_steps must be >= 0 or null, got {every_n_steps}")
        if sets is not None and not sets:
            raise ConfigError("generation.sets is empty; give set names or null for all validation sets")
        self.reward = reward
        self.prompts = prompts
        self.options = EvalOptions(
            samples_per_prompt=samples_per_prompt,
            greedy=greedy,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
        )
        self.every_n_steps = every_n_steps
        self.schedule = MeasurementSchedule(
            DEFAULT_EVERY_N_STEPS if every_n_steps is None else every_n_steps, on_validation
        )
        """When to measure; with ``every_n_steps`` null, ``setup`` sets the divergence monitor's interval."""
        self.sets = sets
        self.samples_file = SamplesFile(samples_file)
        self.active = False
        """Set at ``setup("fit")``: a reward is set and the strategy allows generating."""
        self._reward: RewardFunction | None = None
        self._prompts: dict[str, list[HeldOutPrompt]] = {}
        self._reference: dict[str, list[PromptResult]] = {}
        self._cpu_reference: torch.nn.Module | None = None
        """With ``model.reference=precomputed``: the reference, loaded once per run and kept on the CPU."""
        self.last_results: dict[str, SetResult] = {}
        """The latest measurement's per-set metrics and samples rows."""

    # ------------------------------------------------------------------ start-up

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.reward is None:
            return
        if _sharded(trainer):
            rank_zero_warn(
                "generation: the weights are sharded by DeepSpeed ZeRO-3, where ranks generating different "
                "lengths would run different numbers of collective forwards; gen/* is not logged "
                "(set generation.reward null to hide this)"
            )
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "val_datasets"):
            raise ConfigError("generation: the evaluation needs the run's data as a PreferenceDataModule")
        self._reward = load_reward(self.reward, option=OPTION, device=trainer.strategy.root_device)
        names = list(datamodule.val_set_names) or ["train"]
        for name in self.sets or names:
            if name not in names:
                raise ConfigError(
                    f"generation.sets: no validation set {name!r}; the run has {', '.join(names)}"
                )
        self._prompts = {
            name: held_out_prompts(datamodule, name, self.prompts) for name in self.sets or names
        }
        if self.every_n_steps is None:
            monitors = [c for c in trainer.callbacks if isinstance(c, DivergenceMonitor)]
            self.schedule.every_n_steps = monitors[0].every_n_steps if monitors else DEFAULT_EVERY_N_STEPS
        self._probe(datamodule, next(iter(self._prompts)))
        self.active = True

    def _probe(self, datamodule: Any, set_name: str) -> None:
        """Call the reward once on two held-out prompts and their chosen completions: fail now, not later."""
        assert self._reward is not None
        prompts = self._prompts[set_name][:2]
        dataset = datamodule.train_dataset if set_name == "train" else datamodule.val_datasets[set_name]
        tokenizer = datamodule.tokenizer
        wanted = {tuple(prompt.ids) for prompt in prompts}
        found: dict[tuple[int, ...], str] = {}
        # Prompt-only sets (on-policy methods) hold no completions: an empty one is probed instead.
        rows = (
            dataset.select_columns(["prompt_ids", "chosen_ids"])
            if "chosen_ids" in dataset.column_names
            else []
        )
        for row in rows:
            key = tuple(row["prompt_ids"])
            if key in wanted and key not in found:
                found[key] = tokenizer.decode(row["chosen_ids"], skip_special_tokens=True)
                if len(found) == len(wanted):
                    break
        chosen = [found.get(tuple(prompt.ids), "") for prompt in prompts]
        try:
            self._reward(
                [prompt.text for prompt in prompts],
                chosen,
                conversations=reward_conversations(prompts),
            )
        except RewardError:
            raise
        except Exception as error:  # the reward's own code failed on real inputs
            message = " ".join(str(error).split())[:300]
            raise ConfigError(
                f"{OPTION} {self.reward!r}: calling it on two held-out prompts of {set_name!r} failed: "
                f"{type(error).__name__}: {message}"
            ) from None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Free the kept reference (``model.reference=precomputed``) when the fit ends."""
        if stage == "fit":
            self._cpu_reference = None

    # ------------------------------------------------------------------ when

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            self.samples_file.start(trainer)
        if self.schedule.at_train_start(trainer):
            self._measure_and_log(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.schedule.at_train_batch_end(trainer):
            self._measure_and_log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.at_validation_end(trainer):
            self._measure_and_log(trainer, pl_module)

    # ------------------------------------------------------------------ what

    def _measure_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.active:
            return
        self.last_results = self.measure(trainer, pl_module)
        metrics = metric_names(self.last_results, PREFIX)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update(
            {**{name: torch.tensor(value) for name, value in metrics.items()}, STEP_KEY: torch.tensor(step)}
        )
        self._write_samples(trainer, [row for result in self.last_results.values() for row in result.rows])

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, SetResult]:
        """Judge the current policy on every set (the reference's samples once per run); every process
        returns the results one process judging all prompts would."""
        assert self._reward is not None
        tokenizer = trainer.datamodule.tokenizer
        rank, world = trainer.global_rank, trainer.world_size
        mine = {name: share(len(prompts), rank, world) for name, prompts in self._prompts.items()}
        reference_parts: dict[str, list[PromptResult]] = {}
        own: dict[str, list[PromptResult]] = {}
        prompts = {name: [self._prompts[name][i] for i in indices] for name, indices in mine.items()}
        scoring = {
            "batching": single_row_layout(getattr(pl_module.hparams, "batching", None)),
            "batch_size": self.options.batch_size,
        }
        # Under FSDP the policy's full weights are gathered for the whole measurement (every rank enters
        # together here), after which each rank generates and scores on its own, as many steps as its
        # rows need.
        with full_weights_for_local_forwards(trainer.strategy):
            policy_logps = {}
            for name, indices in mine.items():
                own[name] = judge_prompts(
                    pl_module.policy, tokenizer, prompts[name], indices, self._reward, self.options
                )
                policy_logps[name] = sample_logprobs(pl_module.policy, prompts[name], own[name], **scoring)
            # The reference scores the policy's samples (gen/kl) and, once per run, draws its own.
            with self._reference_model(pl_module) as reference:
                for name, indices in mine.items():
                    if not self._reference:
                        reference_parts[name] = judge_prompts(
                            reference, tokenizer, prompts[name], indices, self._reward, self.options,
                            greedy=False,
                        )  # fmt: skip
                    reference_logps = sample_logprobs(reference, prompts[name], own[name], **scoring)
                    own[name] = with_log_ratios(own[name], policy_logps[name], reference_logps)
        if not self._reference:
            gathered = _all_gather(trainer, reference_parts)
            self._reference = {name: merge(part[name] for part in gathered) for name in self._prompts}
        gathered = _all_gather(trainer, own)
        step = trainer.global_step
        return {
            name: set_result(name, step, merge(part[name] for part in gathered), self._reference[name])
            for name in self._prompts
        }

    @contextmanager
    def _reference_model(self, pl_module: L.LightningModule) -> Iterator[torch.nn.Module]:
        """A reference to generate with and score under: the frozen reference model, the LoRA policy with
        its adapters off, or (``model.reference=precomputed``, no reference in memory) the reference read
        from disk at the first measurement and kept on the CPU between measurements (``gen/kl`` needs it
        every time; the device holds it only while a measurement runs, the point of precomputing)."""
        from ipo_lightning.modeling import load_causal_lm
        from ipo_lightning.reference import AdapterReference, _adapters_off

        reference = getattr(pl_module, "reference", None)
        if isinstance(reference, AdapterReference):
            with _adapters_off(pl_module.policy):
                yield pl_module.policy
        elif reference is not None:
            yield reference.model
        else:
            if self._cpu_reference is None:
                hp = pl_module.hparams
                # Loaded as the module loads a separate reference (same attention kernel), frozen.
                self._cpu_reference = load_causal_lm(
                    hp.reference_name_or_path or hp.model_name_or_path,
                    dtype=hp.reference_dtype or hp.dtype,
                    attn_implementation=hp.attn_implementation,
                    trust_remote_code=hp.trust_remote_code,
                ).requires_grad_(False)
            try:
                yield self._cpu_reference.to(pl_module.device)
            finally:
                self._cpu_reference.to("cpu")

    def _write_samples(self, trainer: L.Trainer, rows: list[dict[str, Any]]) -> None:
        """Append the rows to the samples file in the run folder (rank 0) and log a W&B table."""
        self.samples_file.append(trainer, rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and rows:
                columns = list(rows[0])
                logger.log_table(
                    key=PREFIX + "samples", columns=columns, data=[list(r.values()) for r in rows]
                )


def _sharded(trainer: L.Trainer) -> bool:
    """Whether the strategy shards the weights in a way generation cannot undo (DeepSpeed ZeRO stage 3)."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return strategy.config.get("zero_optimization", {}).get("stage") == 3
    return False


def _all_gather(
    trainer: L.Trainer, obj: dict[str, list[PromptResult]]
) -> list[dict[str, list[PromptResult]]]:
    """Every process's ``obj`` (just ``[obj]`` in a single process)."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
