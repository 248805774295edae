"""``RewardModelModule``: a Bradley-Terry reward model trained on the same preference pairs as IPO/DPO.

The model is ``AutoModelForSequenceClassification`` with one output: a causal LM checkpoint gets a new
score head, and the score of a text is the head's output at its last real token (transformers finds
it from ``config.pad_token_id``, set from the tokenizer). One training step:

1. The batch is the preference batch (:class:`~ipo_lightning.data.collator.PairwiseCollator`): B pairs
   as 2B right-padded rows, prompt + chosen rows, then prompt + rejected rows.
2. One forward over the 2B rows gives the scores r_w (chosen) and r_l (rejected). Plain-text rows are
   scored without the EOS token the tokenizer step appends to each completion, so a row is scored as
   the text ``prompt + completion`` is (what :func:`ipo_lightning.rewards.load_reward` scores for a
   generated completion, whose text holds no EOS); chat rows are scored as the chat template renders
   the conversation, end-of-turn tokens included, as ``load_reward`` scores them with conversations.
   A plain-text row is the preference data's tokenisation, which differs from ``load_reward``'s
   (:func:`~ipo_lightning.rewards.reward_model_inputs`, the whole text ``prompt + completion``) in two
   cases, so the exported model's score of such a pair is not the score it was trained on: a prompt
   longer than ``data.max_prompt_length`` tokens is trained on its last ``max_prompt_length`` tokens
   only (the scorer keeps all of it, up to the model's context), and the prompt and the completion are
   tokenised separately, so a token that the whole text would merge across their boundary (a prompt
   ending in a space or mid-word) is two tokens in training and one in the scorer. Prompts that fit and
   completions that start at a word boundary (``" It is ..."``) score alike.
3. :func:`reward_model_loss` turns the scores into per-pair losses; the step's loss is their mean.
4. Metrics ``rm/accuracy``, ``rm/margin``, ``rm/reward_mean``, ``rm/reward_std`` and ``loss`` are
   logged under ``train/`` and ``val/`` (``val/<name>/`` per set, the first set also plain).
"""

from __future__ import annotations

import json
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse import Namespace
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import AutoTokenizer, PreTrainedModel

from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.data.eval_shards import WEIGHT
from ipo_lightning.data.preprocess import PROMPT_COLUMN
from ipo_lightning.errors import ConfigError
from ipo_lightning.lora import LoraOptions, apply_lora, as_lora_options, check_lora_options, lora_options_dict
from ipo_lightning.metrics import EvalSetMetrics
from ipo_lightning.model_options import (
    DEFAULT_ATTN_IMPLEMENTATION,
    DEFAULT_DISABLE_DROPOUT,
    DEFAULT_DTYPE,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_MIN_LR_RATIO,
    DEFAULT_WARMUP_RATIO,
    with_shared_docs,
)
from ipo_lightning.modeling import (
    AttnImplementation,
    DType,
    check_context_size,
    disable_dropout,
    load_model_config,
    load_sequence_classifier,
)
from ipo_lightning.module import policy_optimizers
from ipo_lightning.schedule import LRSchedule, check_schedule_options

METHOD_NAME = "reward_model"
METRIC_NAMES: tuple[str, ...] = ("loss", "rm/accuracy", "rm/margin", "rm/reward_mean", "rm/reward_std")
"""The metrics logged per split (without the ``train/``/``val/`` prefix)."""


def reward_model_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    preference_prob: Tensor | None = None,
    label_smoothing: float = 0.0,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Per-pair Bradley-Terry loss of a reward model's scores (all shapes [B]).

    With d = r_w - r_l and q the probability that the chosen completion is preferred,

        loss = -q log sigmoid(d) - (1 - q) log sigmoid(-d)  [+ c (r_w + r_l)^2]

    where q = p (the pair's ``preference_prob``; 1 for hard labels, giving -log sigmoid(r_w - r_l)),
    moved towards 1/2 by the label smoothing e: q = (1 - e) p + e (1 - p). The optional term with
    c = ``center_rewards_coefficient`` pulls the scores towards mean 0 (Eisenstein et al. 2023, as
    TRL's RewardTrainer: its batch term ``c * mean((r_w + r_l)^2)`` is the mean of these per-pair
    terms). Computed in at least float32.
    """
    check_reward_loss_options(label_smoothing, center_rewards_coefficient)
    dtype = torch.promote_types(chosen_rewards.dtype, torch.float32)
    chosen, rejected = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    diff = chosen - rejected
    p = torch.ones_like(diff) if preference_prob is None else preference_prob.to(diff)
    q = (1.0 - label_smoothing) * p + label_smoothing * (1.0 - p)
    losses = -q * F.logsigmoid(diff) - (1.0 - q) * F.logsigmoid(-diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def check_reward_loss_options(label_smoothing: float, center_rewards_coefficient: float | None) -> None:
    """Raise ConfigError for loss options :func:`reward_model_loss` cannot use."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if center_rewards_coefficient is not None and not (
        math.isfinite(center_rewards_coefficient) and center_rewards_coefficient >= 0
    ):
        raise ConfigError(
            f"model.center_rewards_coefficient must be >= 0 (or null), got {center_rewards_coefficient}"
        )


def pair_values(chosen_rewards: Tensor, rejected_rewards: Tensor, losses: Tensor) -> dict[str, Tensor]:
    """Per-pair values ([B] each) of the pair metrics: loss, accuracy (r_w > r_l) and margin."""
    return {
        "loss": losses.detach().float(),
        "rm/accuracy": (chosen_rewards > rejected_rewards).float(),
        "rm/margin": (chosen_rewards - rejected_rewards).detach().float(),
    }


class RewardMetrics(nn.Module):
    """Means of the pair metrics and mean and standard deviation of every score, synced across ranks.

    ``rm/reward_mean`` and ``rm/reward_std`` are over all 2B scores (chosen and rejected) seen since
    the last reset; the standard deviation is the population one, sqrt(E[r^2] - E[r]^2).
    """

    def __init__(self) -> None:
        super().__init__()
        keys = ("loss", "accuracy", "margin", "reward", "reward_sq")
        self.means = nn.ModuleDict({key: MeanMetric() for key in keys})

    def update(
        self, chosen_rewards: Tensor, rejected_rewards: Tensor, losses: Tensor, weight: Tensor | None = None
    ) -> None:
        """Accumulate one batch's scores ([B] each) and per-pair losses.

        ``weight`` [B]: how much each pair counts (both its scores count as much); None: 1 each.
        Evaluation passes 0 for the repeats that pad a rank's share (:mod:`ipo_lightning.data.eval_shards`).
        """
        values = pair_values(chosen_rewards, rejected_rewards, losses)
        weight = None if weight is None else weight.float()
        for name, key in (("loss", "loss"), ("rm/accuracy", "accuracy"), ("rm/margin", "margin")):
            self.means[key].update(values[name], weight)
        rewards = torch.cat([chosen_rewards, rejected_rewards]).detach().float()
        score_weight = None if weight is None else torch.cat([weight, weight])
        self.means["reward"].update(rewards, score_weight)
        self.means["reward_sq"].update(rewards**2, score_weight)

    @property
    def update_count(self) -> int:
        """Batches accumulated since the last reset (0: nothing to log)."""
        return int(self.means["loss"].update_count)

    def compute(self) -> dict[str, Tensor]:
        """Every metric of :data:`METRIC_NAMES`, reduced across processes."""
        mean = self.means["reward"].compute()
        variance = (self.means["reward_sq"].compute() - mean**2).clamp(min=0.0)
        return {
            "loss": self.means["loss"].compute(),
            "rm/accuracy": self.means["accuracy"].compute(),
            "rm/margin": self.means["margin"].compute(),
            "rm/reward_mean": mean.float(),
            "rm/reward_std": variance.sqrt().float(),
        }

    def reset(self) -> None:
        """Forget everything accumulated."""
        for metric in self.means.values():
            metric.reset()


def resolve_reward_model_options(config: Namespace) -> None:
    """``method: reward_model``'s resolve: switch off what needs a policy and a reference.

    The divergence monitor (on by default) measures a policy against its reference, which a reward
    model does not have, so it is set off here and the saved config says so. The generation evaluation
    and the KL budget are off unless asked for; asking for them is an error.
    """
    config.divergence.enabled = False
    if config.generation.reward is not None:
        raise ConfigError(
            "generation.reward: the generation evaluation samples from a policy, and method reward_model "
            "trains none; unset generation.reward (score generations with the exported reward model "
            "instead: --generation.reward <run>/hf_model in a policy run)"
        )
    if config.kl_budget.max_kl is not None:
        raise ConfigError(
            "kl_budget.max_kl: method reward_model has no policy and reference to measure a KL between; "
            "unset kl_budget.max_kl"
        )


@with_shared_docs
class RewardModelModule(EvalSetMetrics, L.LightningModule):
    """A Bradley-Terry reward model: a sequence classifier with one output, trained on preference pairs.

    Args:
        model_name_or_path: starting model: a hub id, a local folder or ``builtin:gold`` /
            ``builtin:quickstart``; a causal LM gets a new score head.
        label_smoothing: assumed probability e that a label is flipped: the target probability q of
            the chosen completion becomes (1 - e) p + e (1 - p) (p: the pair's ``preference_prob``).
        center_rewards_coefficient: weight c of c (r_w + r_l)^2 per pair, which keeps the scores
            centred on 0 (TRL's ``center_rewards_coefficient``); null: off.
        optimizer: {shared}
        lr_schedule: {shared}
        warmup_ratio: {shared}
        warmup_steps: {shared}
        min_lr_ratio: {shared}
        dtype: weight dtype; keep float32 and use ``trainer.precision: bf16-mixed`` for speed.
        attn_implementation: {shared}
        trust_remote_code: {shared}
        gradient_checkpointing: {shared}
        max_length: longest row the data produces (linked from ``data.max_length``), checked against
            the model's context size.
        disable_dropout: set every dropout probability of the model to 0 once it is loaded, so a
            pair's two scores are computed alike (TRL's default too); false keeps the model's dropout.
        lora: train LoRA adapters (and the whole score head, peft ``modules_to_save``) instead of every
            weight; null: full fine-tuning. The export is the merged model.
    """

    PROGRESS_BAR = frozenset({"loss", "rm/accuracy"})
    method_name = METHOD_NAME
    """The ``method`` that trains this module (the export's model card reads it)."""
    export_attribute = "model"
    """The attribute holding the Hugging Face model that :class:`~ipo_lightning.callbacks.HFExport` saves."""

    def __init__(
        self,
        model_name_or_path: str,
        label_smoothing: float = 0.0,
        center_rewards_coefficient: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_schedule: LRSchedule = DEFAULT_LR_SCHEDULE,
        warmup_ratio: float = DEFAULT_WARMUP_RATIO,
        warmup_steps: int | None = None,
        min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
        dtype: DType = DEFAULT_DTYPE,
        attn_implementation: AttnImplementation | None = DEFAULT_ATTN_IMPLEMENTATION,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        max_length: int | None = None,
        disable_dropout: bool = DEFAULT_DISABLE_DROPOUT,
        lora: LoraOptions | None = None,
    ) -> None:
        super().__init__()
        check_reward_loss_options(label_smoothing, center_rewards_coefficient)
        lora = as_lora_options(lora)
        if lora is not None:
            check_lora_options(lora)
        check_schedule_options(
            warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps
        )
        # Fail fast on a wrong model path or a too long max_length: no weights are read here.
        self.model_config = load_model_config(model_name_or_path, trust_remote_code=trust_remote_code)
        check_context_size(self.model_config, max_length)
        self.lora_options = lora
        # Saved as a plain dict: hparams.yaml stays safe-loadable and load_from_checkpoint accepts it.
        lora = lora_options_dict(lora)
        # max_length belongs to the data module's hyperparameters (linked from there by the CLI).
        self.save_hyperparameters(ignore=["optimizer", "max_length"])
        self.max_length = max_length
        self.optimizer_factory = optimizer
        self.model: PreTrainedModel | None = None
        self.eos_token_id: int | None = None
        self.train_metrics = RewardMetrics()
        self.val_metrics = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        self._plain_sets: dict[str, bool] = {}

    # ------------------------------------------------------------------ model

    def configure_model(self) -> None:
        """Load the classifier here (not in ``__init__``) so FSDP/DeepSpeed can shard it."""
        if self.model is not None:
            return
        hp = self.hparams
        tokenizer = self._tokenizer()
        self.model = load_sequence_classifier(
            hp.model_name_or_path,
            num_labels=1,
            dtype=hp.dtype,
            attn_implementation=hp.attn_implementation,
            trust_remote_code=hp.trust_remote_code,
        )
        # The score is read at each row's last token that is not padding, found by the pad id.
        self.model.config.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        if hp.disable_dropout:
            changed = disable_dropout(self.model)
            if changed:
                rank_zero_info(
                    f"model.disable_dropout: {len(changed)} dropout setting(s) of the reward model set to 0 "
                    f"(e.g. {changed[0]}); --model.disable_dropout false keeps them"
                )
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if self.lora_options is not None:
            # After dropout is disabled: model.lora.dropout is the adapters' own option and stays as set.
            self.model = apply_lora(
                self.model,
                self.lora_options,
                gradient_checkpointing=hp.gradient_checkpointing,
                task_type="SEQ_CLS",
            )
        self.model.train()

    def _tokenizer(self) -> Any:
        """The data module's tokenizer (pad token set), else the model's own with EOS as pad."""
        trainer = self._trainer
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer else None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(self.hparams.model_name_or_path),
                trust_remote_code=self.hparams.trust_remote_code,
            )
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def setup(self, stage: str) -> None:
        """Check the data's length against the model and note which sets hold plain-text records."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.max_length is None:
            check_context_size(self.model_config, getattr(datamodule, "max_length", None))
        if datamodule is None or not hasattr(datamodule, "stage_sets"):
            return
        for label, dataset in datamodule.stage_sets(stage).items():
            self._plain_sets[label] = _is_plain_text(dataset)

    # ------------------------------------------------------------------ scores

    def score_rows(self, batch: dict[str, Tensor], plain_text: bool = True) -> Tensor:
        """Scores [2B] of a pairwise batch's rows (chosen rows first), float32.

        ``plain_text``: the rows are plain-text records, whose completions end in an EOS token the
        tokenizer step appended; it is left out of the scored text (module docstring).
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if plain_text and self.eos_token_id is not None:
            input_ids, attention_mask = _without_appended_eos(
                input_ids, attention_mask, batch["completion_mask"], self.eos_token_id, self._pad_id()
            )
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, 0].float()

    def _pad_id(self) -> int:
        return int(self.model.config.get_text_config().pad_token_id)

    def forward_pairs(
        self, batch: dict[str, Tensor], plain_text: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen scores, rejected scores and per-pair losses ([B] each) of a pairwise batch."""
        hp = self.hparams
        scores = self.score_rows(batch, plain_text)
        num_pairs = scores.shape[0] // 2
        chosen, rejected = scores[:num_pairs], scores[num_pairs:]
        prob = batch.get("preference_prob")
        losses = reward_model_loss(
            chosen,
            rejected,
            preference_prob=prob if prob is not None and bool((prob < 1).any()) else None,
            label_smoothing=hp.label_smoothing,
            center_rewards_coefficient=hp.center_rewards_coefficient,
        )
        return chosen, rejected, losses

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One micro-batch: the mean per-pair loss. Metrics are logged per optimizer step (below)."""
        chosen, rejected, losses = self.forward_pairs(batch, self._plain_sets.get("train", True))
        self.train_metrics.update(chosen, rejected, losses)
        return losses.mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``train/*`` over every pair of the optimizer step (all micro-batches, all ranks)."""
        shown = {"loss", "rm/accuracy"}
        for name, value in self.train_metrics.compute().items():
            self.log(f"train/{name}", value, prog_bar=name in shown, on_step=True, on_epoch=False)
        self.train_metrics.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the metrics of val set number ``dataloader_idx``."""
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the metrics of test set number ``dataloader_idx``."""
        self._eval_step("test", batch, dataloader_idx)

    def _eval_step(self, split: str, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        name = self._set_names(split)[dataloader_idx]
        chosen, rejected, losses = self.forward_pairs(batch, self._plain_sets.get(f"{split}/{name}", True))
        self._ensure_metrics(split)[name].update(chosen, rejected, losses, batch.get(WEIGHT))

    # ------------------------------------------------------------------ metrics per eval set

    def new_eval_metrics(self) -> RewardMetrics:
        """The metrics of one validation or test set."""
        return RewardMetrics()

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over every trainable weight, with warm-up and decay per step (the policy
        methods' :func:`~ipo_lightning.module.policy_optimizers`)."""
        assert self.model is not None
        return policy_optimizers(self.model, self.optimizer_factory, self.hparams, self.trainer)

    # ------------------------------------------------------------------ export

    def export_info(self) -> dict[str, Any]:
        """What ``ipo_lightning.json`` of the export states about the training (HFExport adds the step)."""
        hp = self.hparams
        return {
            "method": METHOD_NAME,
            "base_model": hp.model_name_or_path,
            "loss": "bradley_terry",
            "label_smoothing": hp.label_smoothing,
            "center_rewards_coefficient": hp.center_rewards_coefficient,
            "lora": hp.lora,
        }


def _without_appended_eos(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """The rows with each completion's final EOS token turned into padding (rows without one kept)."""
    lengths = attention_mask.sum(-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = (lengths - 1).clamp(min=0)
    drop = (input_ids[rows, last] == eos_token_id) & completion_mask[rows, last] & (lengths > 1)
    if not bool(drop.any()):
        return input_ids, attention_mask
    input_ids, attention_mask = input_ids.clone(), attention_mask.clone()
    input_ids[rows[drop], last[drop]] = pad_token_id
    attention_mask[rows[drop], last[drop]] = 0
    return input_ids, attention_mask


def _is_plain_text(dataset: Any) -> bool:
    """Whether a tokenised set holds plain-text records (its prompts are strings, not chat messages).

    A set comes from one source, whose format is detected once, so its first record speaks for all.
    """
    if len(dataset) == 0 or PROMPT_COLUMN not in dataset.column_names:
        return True
    return not isinstance(json.loads(dataset[0][PROMPT_COLUMN]), list)
