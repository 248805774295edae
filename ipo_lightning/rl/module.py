"""``OnPolicyModule``: what the on-policy methods (RLOO, online IPO/DPO) share.

One training step, top to bottom:

1. The batch holds B distinct prompts (:class:`~ipo_lightning.rl.data.PromptDataModule`).
2. The policy samples k completions per prompt with
   :func:`~ipo_lightning.generation.generate_completions` (ancestral, temperature 1, full softmax, so
   the samples come from exactly the distribution whose log-probs are trained). The seed is drawn from
   ``(seed, optimizer step)`` and each completion from ``(that seed, prompt index, sample)``: a run is
   deterministic and a resumed run draws what the uninterrupted one would.
3. The reward (:func:`~ipo_lightning.rewards.load_reward`) scores every completion;
   ``missing_eos_penalty`` is subtracted from samples that did not end.
4. Policy (with autograd) and reference (without) score the completion tokens, EOS included, through
   the one scoring path (:mod:`ipo_lightning.rl.rollout`).
5. The method's loss (:meth:`OnPolicyModule.rollout_loss`) turns the rollout into a scalar.

Policy and reference are loaded, and the optimizer and schedule built, by the same functions as
:class:`~ipo_lightning.module.PreferenceModule`'s (``model.reference``: separate or lora; precomputed
cannot apply to samples drawn during training).

Metrics, per optimizer step (every micro-batch and rank) as ``train/<name>`` and after validation as
``val/<name>`` (``val/<set>/<name>`` per set with several):

- ``reward``: mean reward of the samples (before ``missing_eos_penalty``);
- ``kl``: mean per-sequence ``log pi(y) - log ref(y)`` of the samples, an unbiased estimate of the
  sequence-level KL(pi || ref) (nats per completion);
- ``entropy``: mean over every sampled completion token of the policy's full-vocabulary entropy
  ``H(pi(. | x, y_<t))`` (nats per token, at temperature 1);
- ``length``: mean completion tokens (EOS included); ``eos_rate``: share of samples that ended;
- ``loss`` (train only) and the method's own values.

Validation samples each validation prompt the same way (k samples, a fixed seed, so measurements
compare) and logs the rollout metrics; no loss.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ipo_lightning.batching import Batching, BatchingOption
from ipo_lightning.data.eval_shards import WEIGHT
from ipo_lightning.data.preprocess import PROMPT_COLUMN
from ipo_lightning.data.prompts import held_out_prompt, reward_conversations
from ipo_lightning.distributed import check_on_policy_strategy, full_weights_for_local_forwards
from ipo_lightning.errors import ConfigError
from ipo_lightning.generation import generate_completions, row_seed
from ipo_lightning.lora import LoraOptions, lora_options_dict
from ipo_lightning.metrics import EvalSetMetrics, PreferenceMetrics
from ipo_lightning.model_options import (
    DEFAULT_ATTN_IMPLEMENTATION,
    DEFAULT_BATCHING,
    DEFAULT_DISABLE_DROPOUT,
    DEFAULT_DTYPE,
    DEFAULT_LOGPROB_CHUNK_SIZE,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_MIN_LR_RATIO,
    DEFAULT_WARMUP_RATIO,
    with_shared_docs,
)
from ipo_lightning.modeling import AttnImplementation, DType, check_context_size
from ipo_lightning.module import (
    check_policy_options,
    default_beta,
    default_length_normalize,
    load_policy_and_reference,
    policy_optimizers,
    resolve_model_batching,
)
from ipo_lightning.reference import (
    ModelReference,
    ReferenceStrategy,
    ignore_missing_reference_keys,
    resolve_reference_strategy,
)
from ipo_lightning.rewards import RewardFunction, load_reward, names_reward_model
from ipo_lightning.rl.data import PROMPT_IDS, PROMPT_INDEX
from ipo_lightning.rl.rollout import Rollout, completion_rows, score_rows
from ipo_lightning.schedule import LRSchedule

ROLLOUT_METRICS: tuple[str, ...] = ("reward", "kl", "entropy", "length", "eos_rate")
"""Metrics of every rollout, train and val (names without the ``train/``/``val/`` prefix)."""
REWARD_OPTION = "model.reward"
VALIDATION_STREAM = -1
"""Seed stream of validation samples (training steps use the step number, >= 0)."""
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_GENERATION_BATCH_SIZE = 64


def on_policy_layout(batching: Batching) -> Batching:
    """The layout sampled rows run in: ``batching`` resolved from ``auto``, with prefix_shared (which
    ``auto`` picks for sdpa/eager, a layout of chosen/rejected pairs) as padding_free: every model that
    runs prefix_shared runs padding_free too."""
    return "padding_free" if batching == "prefix_shared" else batching


def default_label_temperature(reward: str) -> float:
    """``label_temperature``'s default for the reward spec ``reward``: 1 for a reward model, whose
    Bradley-Terry probability sigmoid(r_1 - r_2) is the label it was fitted to predict (hard labels
    train every pair to the full margin, however close, and over-optimise a learnt reward); 0 (hard
    labels) for a reward function, whose scale says nothing of a probability."""
    return 1.0 if names_reward_model(reward) else 0.0


def resolve_on_policy_options(config: Namespace) -> None:
    """Refuse a strategy the on-policy methods cannot sample under
    (:func:`~ipo_lightning.distributed.check_on_policy_strategy`), then fill the ``model`` defaults that
    depend on other options in the parsed config (the on-policy methods' ``resolve``, see
    :mod:`ipo_lightning.methods`): the reference strategy from ``lora``, the layout from
    ``batching: auto``, ``sampling_seed`` from ``seed_everything`` and, for online IPO/DPO, ``beta`` and
    ``length_normalize`` from ``loss_type`` and ``label_temperature`` from ``reward``, so the saved
    ``config.yaml`` states the values used."""
    check_on_policy_strategy(config.get("trainer", {}).get("strategy"))
    model = config.model
    if model.sampling_seed is None:
        # LightningCLI has set seed_everything to an int by now (True: a drawn one); False/None: 0.
        seed = config.get("seed_everything")
        model.sampling_seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    model.reference = resolve_reference_strategy(model.reference, uses_lora=model.lora is not None)
    if model.batching == "auto" and model.reference != "precomputed":
        resolved = resolve_model_batching(
            model.batching,
            model_name_or_path=model.model_name_or_path,
            reference_name_or_path=model.reference_name_or_path,
            reference=model.reference,
            attn_implementation=model.attn_implementation,
            trust_remote_code=model.trust_remote_code,
        )
        model.batching = on_policy_layout(resolved)
    if "loss_type" in model:
        if model.beta is None:
            model.beta = default_beta(model.loss_type)
        if model.length_normalize is None:
            model.length_normalize = default_length_normalize(model.loss_type)
    if "label_temperature" in model and model.label_temperature is None:
        model.label_temperature = default_label_temperature(model.reward)


@with_shared_docs
class OnPolicyModule(EvalSetMetrics, L.LightningModule):
    """Base of the on-policy methods (module docstring); subclasses define :meth:`rollout_loss`.

    A subclass's ``__init__`` declares ``model_name_or_path``, ``reward`` and the method's own options
    and forwards the rest as ``**kwargs`` to this one, so each shared option's type, default and doc
    are written here once: the CLI (jsonargparse follows ``super().__init__(**kwargs)``) lists them
    after the method's own. ``samples_per_prompt`` and ``method_options`` come from the subclass, never
    from a user; ``method_options`` are the method's own (resolved) options, saved in the
    hyperparameters with the shared ones, so that the hyperparameters are exactly the subclass's
    options.

    Args:
        model_name_or_path: {shared}
        reward: {shared}
        missing_eos_penalty: subtracted from the reward of a sample that did not end within
            ``max_new_tokens`` (TRL's option of the same name); null: none. ``train/reward`` is logged
            before it.
        max_new_tokens: longest sampled completion in tokens.
        generation_batch_size: rows (prompt x sample) per ``generate`` call.
        sampling_seed: base seed of the training samples (with the optimizer step and prompt index);
            null (default): ``seed_everything``, so a seed replicate also draws other samples.
        reference_name_or_path: {shared}
        reference: ``separate`` (a frozen copy) or ``lora`` (the LoRA policy's base with adapters
            off). Default (null): lora when ``lora`` is set, else separate. (``precomputed`` cannot
            apply: the samples are drawn during training.)
        lora: {shared}
        optimizer: {shared}
        lr_schedule: {shared}
        warmup_ratio: {shared}
        warmup_steps: {shared}
        min_lr_ratio: {shared}
        dtype: weight dtype of the policy (keep float32; use ``trainer.precision`` for speed).
        reference_dtype: weight dtype of the frozen reference; default: ``dtype``.
        attn_implementation: {shared}
        trust_remote_code: allow model code from the hub.
        gradient_checkpointing: {shared}
        max_length: longest prompt + completion (linked from ``data.max_length``).
        logprob_chunk_size: tokens per chunk of the float32 log-softmax.
        batching: how sampled rows run through policy and reference: ``padded`` or ``padding_free``;
            ``auto`` (default): padding_free where the models support it, else padded.
        disable_dropout: set every dropout probability of the policy to 0 once it is loaded.
        samples_per_prompt: k, samples per prompt (set by the method).
        method_options: the method's own options, resolved, for the hyperparameters.
    """

    PROGRESS_BAR = frozenset({"reward"})

    method_name: str = ""
    """The ``method`` value that selects the subclass (``rloo``, ``online``)."""
    method_metrics: tuple[str, ...] = ()
    """The method's own training metrics, besides :data:`ROLLOUT_METRICS` and ``loss``."""
    method_export_keys: tuple[str, ...] = ()
    """The method's own hyperparameters that ``ipo_lightning.json`` states (:meth:`export_info`)."""

    def __init__(
        self,
        model_name_or_path: str,
        reward: str,
        missing_eos_penalty: float | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        generation_batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
        sampling_seed: int | None = None,
        reference_name_or_path: str | None = None,
        reference: ReferenceStrategy | None = None,
        lora: LoraOptions | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_schedule: LRSchedule = DEFAULT_LR_SCHEDULE,
        warmup_ratio: float = DEFAULT_WARMUP_RATIO,
        warmup_steps: int | None = None,
        min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
        dtype: DType = DEFAULT_DTYPE,
        reference_dtype: DType | None = None,
        attn_implementation: AttnImplementation | None = DEFAULT_ATTN_IMPLEMENTATION,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        max_length: int | None = None,
        logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
        batching: BatchingOption = DEFAULT_BATCHING,
        disable_dropout: bool = DEFAULT_DISABLE_DROPOUT,
        *,
        samples_per_prompt: int,
        method_options: dict[str, Any],
    ) -> None:
        super().__init__()
        if reference == "precomputed":
            raise ConfigError(
                "model.reference=precomputed cannot apply to an on-policy method: its samples are drawn "
                "during training, so their reference log-probs cannot be computed before it; use "
                "model.reference separate (or lora with model.lora)"
            )
        if batching == "prefix_shared":
            raise ConfigError(
                "model.batching=prefix_shared lays out chosen/rejected pairs; on-policy samples run "
                "padded or padding_free (auto picks)"
            )
        if max_new_tokens < 1 or generation_batch_size < 1:
            raise ConfigError(
                "model.max_new_tokens and model.generation_batch_size must be >= 1, got "
                f"{max_new_tokens}, {generation_batch_size}"
            )
        if missing_eos_penalty is not None and missing_eos_penalty < 0:
            raise ConfigError(f"model.missing_eos_penalty must be >= 0 or null, got {missing_eos_penalty}")
        resolved = check_policy_options(
            model_name_or_path=model_name_or_path,
            reference_name_or_path=reference_name_or_path,
            reference=reference,
            lora=lora,
            dtype=dtype,
            reference_dtype=reference_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            max_length=max_length,
            logprob_chunk_size=logprob_chunk_size,
            warmup_ratio=warmup_ratio,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            batching=batching,
        )
        self.model_config = resolved.model_config
        self.lora_options = resolved.lora
        layout = on_policy_layout(resolved.batching)
        # Saved explicitly (resolved values, not the caller's nulls); hparams.yaml stays safe-loadable.
        self.save_hyperparameters(
            {
                "model_name_or_path": model_name_or_path,
                "reward": reward,
                "reference_name_or_path": reference_name_or_path,
                "reference": resolved.reference,
                "lora": lora_options_dict(resolved.lora),
                "lr_schedule": lr_schedule,
                "warmup_ratio": warmup_ratio,
                "warmup_steps": warmup_steps,
                "min_lr_ratio": min_lr_ratio,
                "dtype": dtype,
                "reference_dtype": reference_dtype,
                "attn_implementation": attn_implementation,
                "trust_remote_code": trust_remote_code,
                "gradient_checkpointing": gradient_checkpointing,
                "logprob_chunk_size": logprob_chunk_size,
                "batching": layout,
                "disable_dropout": disable_dropout,
                "max_new_tokens": max_new_tokens,
                "generation_batch_size": generation_batch_size,
                # None outside the CLI, which resolves it. Not "seed": the data module has that hparam.
                "sampling_seed": 0 if sampling_seed is None else sampling_seed,
                "missing_eos_penalty": missing_eos_penalty,
                **method_options,
            }
        )
        self.samples_per_prompt = samples_per_prompt
        """k, samples per prompt (an option of RLOO, 2 for online IPO/DPO)."""
        self.max_length = max_length
        self.optimizer_factory = optimizer
        self.policy: PreTrainedModel | None = None
        self.reference: ModelReference | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        """The data's tokenizer (set by ``setup`` from the data module)."""
        self.reward_function: RewardFunction | None = None
        """The loaded reward (set by ``setup``, or by a caller using the module without a Trainer)."""
        names = (*ROLLOUT_METRICS, "loss", *self.method_metrics)
        self.train_metrics = PreferenceMetrics(names)
        self.val_metrics = torch.nn.ModuleDict()
        self.register_load_state_dict_post_hook(ignore_missing_reference_keys)

    # ------------------------------------------------------------------ models and data

    def configure_model(self) -> None:
        """Load policy and reference (as :class:`~ipo_lightning.module.PreferenceModule` does)."""
        if self.policy is None:
            self.policy, self.reference = load_policy_and_reference(self.hparams, self.lora_options)

    def setup(self, stage: str) -> None:
        """Take the tokenizer from the data, check lengths against it and load the reward."""
        check_on_policy_strategy(self.trainer.strategy)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            raise ConfigError("an on-policy method needs its prompts from a PromptDataModule")
        self.tokenizer = datamodule.tokenizer
        built = [datamodule.train_dataset, *datamodule.val_datasets.values()]
        longest = max((max(map(len, d[PROMPT_IDS])) for d in built if d is not None), default=0)
        max_length = self.max_length or datamodule.max_length
        if longest + self.hparams.max_new_tokens > max_length:
            raise ConfigError(
                f"the longest prompt ({longest} tokens, data.max_prompt_length "
                f"{datamodule.max_prompt_length}) plus model.max_new_tokens ({self.hparams.max_new_tokens}) "
                f"exceeds data.max_length ({max_length}); lower one or raise data.max_length"
            )
        check_context_size(self.model_config, max_length)
        if self.reward_function is None:
            self.reward_function = load_reward(
                self.hparams.reward, option=REWARD_OPTION, device=self.trainer.strategy.root_device
            )

    # ------------------------------------------------------------------ rollouts

    def step_seed(self, step: int) -> int:
        """The generation seed of optimizer step ``step`` (:data:`VALIDATION_STREAM` for validation)."""
        return row_seed(self.hparams.sampling_seed, step, 0)

    def rollout(self, batch: dict[str, Any], *, seed: int) -> Rollout:
        """Sample, reward and score k completions of each prompt of ``batch`` (module docstring)."""
        assert self.policy is not None and self.reference is not None and self.tokenizer is not None
        assert self.reward_function is not None, "no reward loaded (setup has not run)"
        hp = self.hparams
        k = self.samples_per_prompt
        prompt_ids = batch[PROMPT_IDS]
        prompts = [
            held_out_prompt(self.tokenizer, raw, ids)
            for raw, ids in zip(batch[PROMPT_COLUMN], prompt_ids, strict=True)
        ]
        # Under FSDP2 the policy's full weights are gathered for sampling: ranks end their samples
        # apart, so their generate() calls run different numbers of forwards.
        with full_weights_for_local_forwards(self._trainer and self._trainer.strategy, self.policy):
            completions = generate_completions(
                self.policy,
                self.tokenizer,
                prompt_ids,
                k=k,
                seed=seed,
                max_new_tokens=hp.max_new_tokens,
                batch_size=hp.generation_batch_size,
                prompt_indices=[int(index) for index in batch[PROMPT_INDEX]],
            )
        flat = [completion for row in completions for completion in row]
        flat_prompts = [prompt for prompt in prompts for _ in range(k)]
        scores = self.reward_function(
            [prompt.text for prompt in flat_prompts],
            [completion.text for completion in flat],
            conversations=reward_conversations(flat_prompts),
        )
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = completion_rows(
            [prompt.ids for prompt in flat_prompts], [completion.token_ids for completion in flat], pad_id
        )
        rows = tuple(tensor.to(self.device) for tensor in rows)
        options = {"batching": hp.batching, "chunk_size": hp.logprob_chunk_size}
        policy_scores, entropy = score_rows(self.policy, rows, entropy=True, **options)
        with torch.no_grad():
            reference_scores, _ = score_rows(self.reference.model, rows, entropy=False, **options)
        shape = (len(prompts), k)
        rewards = torch.tensor(scores, dtype=torch.float32, device=self.device).view(shape)
        ended = torch.tensor([c.ended for c in flat], device=self.device).view(shape)
        penalty = hp.missing_eos_penalty or 0.0
        return Rollout(
            prompts=prompts,
            completions=completions,
            rewards=rewards,
            shaped_rewards=rewards - penalty * (~ended).float(),
            policy_logps=policy_scores.sums.view(shape),
            reference_logps=reference_scores.sums.detach().view(shape),
            lengths=policy_scores.counts.view(shape),
            ended=ended,
            entropy=entropy,
        )

    @staticmethod
    def rollout_values(rollout: Rollout) -> dict[str, Tensor]:
        """Per-sample (per-token for ``entropy``) values of :data:`ROLLOUT_METRICS`, for averaging."""
        return {
            "reward": rollout.rewards.flatten(),
            "kl": rollout.kl.flatten(),
            "entropy": rollout.entropy,
            "length": rollout.lengths.flatten().float(),
            "eos_rate": rollout.ended.flatten().float(),
        }

    @staticmethod
    def rollout_weights(rollout: Rollout, weight: Tensor) -> dict[str, Tensor]:
        """Weights shaped like :meth:`rollout_values` from one weight per prompt (``weight`` [B]): each
        of a prompt's samples, and each token of them for ``entropy``, weighs what the prompt does."""
        per_sample = weight.float()[:, None].expand_as(rollout.rewards).flatten()
        per_token = per_sample.repeat_interleave(rollout.lengths.flatten())
        return {name: per_token if name == "entropy" else per_sample for name in ROLLOUT_METRICS}

    def rollout_loss(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """The method's loss of a rollout and the values of its :attr:`method_metrics`."""
        raise NotImplementedError

    def export_info(self) -> dict[str, Any]:
        """What ``ipo_lightning.json`` of the export states about the training (HFExport adds the step):
        the method, the reward it was trained against, k, the method's own options and the reference."""
        hp = self.hparams
        return {
            "method": self.method_name,
            "base_model": hp.model_name_or_path,
            "reward": hp.reward,
            "samples_per_prompt": self.samples_per_prompt,
            **{name: hp[name] for name in self.method_export_keys},
            "missing_eos_penalty": hp.missing_eos_penalty,
            "max_new_tokens": hp.max_new_tokens,
            "reference": hp.reference,
            "lora": hp.lora,
        }

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Sample with this step's seed, score, and return the method's loss."""
        rollout = self.rollout(batch, seed=self.step_seed(self.global_step))
        loss, values = self.rollout_loss(rollout)
        self.train_metrics.update({**self.rollout_values(rollout), "loss": loss.detach(), **values})
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``train/*`` over every sample of the optimizer step (all micro-batches, all ranks)."""
        shown = {"loss", "reward", "kl"}
        for name, value in self.train_metrics.compute().items():
            self.log(f"train/{name}", value, prog_bar=name in shown, on_step=True, on_epoch=False)
        self.train_metrics.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Sample the validation prompts (a fixed seed per set) and accumulate the rollout metrics."""
        with torch.no_grad():
            rollout = self.rollout(batch, seed=self.step_seed(VALIDATION_STREAM - dataloader_idx))
        weight = batch.get(WEIGHT)
        weights = None if weight is None else self.rollout_weights(rollout, weight.to(self.device))
        set_name = self._set_names("val")[dataloader_idx]
        self._ensure_metrics("val")[set_name].update(self.rollout_values(rollout), weights)

    def new_eval_metrics(self) -> PreferenceMetrics:
        """The rollout metrics of one validation set (logged by :class:`EvalSetMetrics`)."""
        return PreferenceMetrics(ROLLOUT_METRICS)

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer and schedule of :func:`~ipo_lightning.module.policy_optimizers`."""
        assert self.policy is not None
        return policy_optimizers(self.policy, self.optimizer_factory, self.hparams, self.trainer)
