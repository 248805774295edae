"""``PromptDataModule``: distinct prompts, tokenised as for training, batched for on-policy methods.

A source is either a preference set of any format the project reads (its ``prompt`` field, normalised
as :func:`~ipo_lightning.data.formats.normalise` does, the implicit format's shared prefix included) or
a prompt file: records with a ``prompt`` field only (a string or a list of chat messages). Prompts are
tokenised by :meth:`~ipo_lightning.data.tokenize.PairTokenizer.prompt_ids` (chat template with the
generation prompt for messages, cut from the left to ``max_prompt_length``), and a prompt that occurs
several times is kept once, at its first occurrence.

A built set has the columns ``prompt_ids``, ``prompt_json`` (the normalised prompt as JSON, as
preference sets keep it, so :func:`~ipo_lightning.data.prompts.held_out_prompts` and the generation
evaluation read it unchanged) and ``prompt_index`` (the prompt's row, which seeds its samples). Training
batches are drawn by the preference data's :class:`~ipo_lightning.data.sampler.ResumableDistributedSampler`
(one shuffle per epoch shared by all ranks, resumed mid-epoch from a checkpoint).
"""

# No ``from __future__ import annotations`` here: for a class whose annotations are strings,
# jsonargparse (the CLI's parser) runs its module's TYPE_CHECKING block to resolve them, which
# would import datasets for every --help. The annotations naming datasets are quoted instead.

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ipo_lightning.data.datamodule import load_tokenizer
from ipo_lightning.data.eval_shards import WEIGHT, eval_loaders
from ipo_lightning.data.formats import (
    DATA_FORMATS,
    DataFormat,
    Dropped,
    Text,
    column_of,
    normalise,
    normalise_prompt,
    validate_columns,
)
from ipo_lightning.data.preprocess import PROMPT_COLUMN, resolve_format
from ipo_lightning.data.sampler import ResumableDistributedSampler, replicas
from ipo_lightning.data.sources import DataSource, LoadedSource, check_source, load_source, record_line
from ipo_lightning.data.tokenize import PairTokenizer, check_lengths
from ipo_lightning.errors import ConfigError, DataError

if TYPE_CHECKING:
    # Types only: datasets (with pandas and pyarrow) loads where data is loaded, not for --help.
    import datasets

PROMPT_IDS = "prompt_ids"
PROMPT_INDEX = "prompt_index"


class PromptDataModule(L.LightningDataModule):
    """Prompts for on-policy training: batches of distinct prompts, and validation sets of prompts.

    Args:
        train: Training prompts: a preference set (its prompts) or a prompt file (records with ``prompt``).
        val: Named validation sets of prompts, e.g. {in_dist: ..., ood: ...}, in this order.
        tokenizer_name_or_path: Tokenizer to load: a local folder, a hub id or a builtin: model.
        format: Layout of preference records: auto, plain, conversational or implicit (prompt files:
            auto).
        columns: Canonical field -> source column, e.g. {prompt: question}.
        max_length: Most tokens of prompt + completion (the policy's ``max_new_tokens`` must fit after
            ``max_prompt_length``).
        max_prompt_length: Prompts are cut to their last N tokens; None: no cut (error if too long).
        batch_size: Prompts per training batch (each sampled ``samples_per_prompt`` times).
        val_batch_size: Prompts per validation batch; None: batch_size.
        num_workers: DataLoader worker processes.
        cache_dir: datasets cache folder; None: datasets' default (HF_DATASETS_CACHE).
        seed: Seed of the training shuffle.
        trust_remote_code: Allow custom tokenizer code from the tokenizer's repository.
    """

    def __init__(
        self,
        train: DataSource | None = None,
        val: dict[str, DataSource] | None = None,
        tokenizer_name_or_path: str | None = None,
        format: DataFormat = "auto",
        columns: dict[str, str] | None = None,
        max_length: int = 512,
        max_prompt_length: int | None = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "train": None if train is None else vars(train).copy(),
                "val": {name: vars(source).copy() for name, source in (val or {}).items()} or None,
                "tokenizer_name_or_path": tokenizer_name_or_path,
                "format": format,
                "columns": columns,
                "max_length": max_length,
                "max_prompt_length": max_prompt_length,
                "batch_size": batch_size,
                "val_batch_size": val_batch_size,
                "seed": seed,
            }
        )
        check_lengths(max_length, max_prompt_length, prefix="data.")
        for source in [train, *(val or {}).values()]:
            if source is not None:
                check_source(source)
        if format not in DATA_FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got {format!r}")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size or batch_size)):
            if value < 1:
                raise ConfigError(f"data.{name} must be at least 1, got {value}")
        self.train = train
        self.val = dict(val or {})
        self.format = format
        self.columns = validate_columns(columns)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.seed = seed
        self.tokenizer = (
            load_tokenizer(tokenizer_name_or_path, trust_remote_code=trust_remote_code)
            if tokenizer_name_or_path
            else None
        )
        self.train_dataset: datasets.Dataset | None = None
        self.val_datasets: dict[str, datasets.Dataset] = {}
        self._resume_position: tuple[int, int] | None = None

    @property
    def val_set_names(self) -> list[str]:
        """Names of the validation sets, in the order of ``val_dataloader()``."""
        return list(self.val)

    def setup(self, stage: str | None = None) -> None:
        """Build the sets the stage needs (fit: train and val; validate: val); built sets are kept."""
        if stage == "fit" and self.train is None:
            raise ConfigError("fit needs training prompts: set data.train.path")
        if stage == "validate" and not self.val:
            raise ConfigError("validate needs a validation set: set data.val.<name>.path")
        if stage in (None, "fit") and self.train is not None and self.train_dataset is None:
            self.train_dataset = self.build("train", self.train)
        if stage in (None, "fit", "validate"):
            for name, source in self.val.items():
                if name not in self.val_datasets:
                    self.val_datasets[name] = self.build(name, source)

    def build(self, name: str, source: DataSource) -> "datasets.Dataset":
        """The distinct prompts of ``source``, tokenised (see module docstring).

        Raises:
            DataError: a malformed record (file, line and field named), or no prompt at all.
        """
        import datasets

        if self.tokenizer is None:
            raise ConfigError("data.tokenizer_name_or_path is not set (normally linked from the model path)")
        loaded = load_source(source, cache_dir=self.cache_dir)
        prompts = distinct_prompts(loaded, self.format, self.columns)
        if not prompts:
            raise DataError(f"{name}: {loaded.label}: no prompts (every record was dropped)")
        tokenizer = PairTokenizer(self.tokenizer, self.max_length, self.max_prompt_length)
        ids = []
        for index, prompt in prompts:
            try:
                ids.append(tokenizer.prompt_ids(prompt))
            except DataError as error:
                raise DataError(f"{_where(loaded, index)}: {error}") from None
        rank_zero_info(f"{name}: {len(prompts)} distinct prompts of {len(loaded.dataset)} records")
        return datasets.Dataset.from_dict(
            {
                PROMPT_IDS: ids,
                PROMPT_COLUMN: [json.dumps(prompt, ensure_ascii=False) for _, prompt in prompts],
                PROMPT_INDEX: list(range(len(prompts))),
            }
        )

    # ------------------------------------------------------------------ loaders

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of prompts, this rank's share of each global batch (resumable, see sampler)."""
        if self.train_dataset is None:
            raise ConfigError("call setup('fit') first")
        trainer = self.trainer
        sampler = ResumableDistributedSampler(
            self.train_dataset,
            batch_size=self.batch_size,
            **replicas(trainer),
            seed=self.seed,
        )
        if self._resume_position is not None:
            sampler.skip_batches(*self._resume_position)
            self._resume_position = None
        return self._loader(self.train_dataset, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per validation set, in ``val_set_names`` order (a list even for one set); each rank
        gets an equal share, padded with weight-0 repeats, so every prompt counts once."""
        return eval_loaders(
            self.val_datasets, self.val_set_names, "validate", self.trainer, self._loader, self.val_batch_size
        )

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler: DistributedSampler | None = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # The loader's own generator draws the worker base seed (not the global RNG).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch (as :class:`PreferenceDataModule` saves it)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the training order at the checkpoint's position (applied by ``train_dataloader``)."""
        if "epoch" in state_dict:
            self._resume_position = (state_dict["epoch"], state_dict["batches_done"])


def collate_prompts(rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor | list[Any]]:
    """A batch of prompts: ``prompt_index`` [B] (long), ``prompt_ids`` and ``prompt_json`` (lists), and
    ``weight`` [B] (float) when every row has one (validation, see :mod:`~ipo_lightning.data.eval_shards`)."""
    batch: dict[str, Tensor | list[Any]] = {
        PROMPT_INDEX: torch.tensor([int(row[PROMPT_INDEX]) for row in rows], dtype=torch.long),
        PROMPT_IDS: [list(row[PROMPT_IDS]) for row in rows],
        PROMPT_COLUMN: [row[PROMPT_COLUMN] for row in rows],
    }
    if all(WEIGHT in row for row in rows):
        batch[WEIGHT] = torch.tensor([float(row[WEIGHT]) for row in rows], dtype=torch.float32)
    return batch


def distinct_prompts(
    loaded: LoadedSource, fmt: str, columns: Mapping[str, str] | None = None
) -> list[tuple[int, Text]]:
    """``(record number, prompt)`` of each distinct prompt of a source, in record order.

    A source with a ``chosen`` or ``rejected`` column is a preference set (its records normalised as
    for training; a dropped pair gives no prompt); otherwise every record is a prompt-only record.

    Raises:
        DataError: a malformed record, named by file and line (or source and record number).
    """
    dataset = loaded.dataset
    names = dataset.column_names
    pairs = any(column_of(field, columns) in names for field in ("chosen", "rejected"))
    if pairs:
        resolved = resolve_format(loaded, fmt, columns)
    elif column_of("prompt", columns) not in names:
        raise DataError(
            f"{loaded.label}: no column {column_of('prompt', columns)!r} for the prompt field; the columns "
            f"are {', '.join(names)}. Map yours with `columns`, e.g. {{'prompt': 'your_column'}}"
        )
    seen: set[str] = set()
    prompts: list[tuple[int, Text]] = []
    for index, record in enumerate(dataset):
        try:
            if pairs:
                example = normalise(record, resolved, columns)
                if isinstance(example, Dropped):
                    continue
                prompt = example.prompt
            else:
                prompt = normalise_prompt(record, columns)
        except DataError as error:
            raise DataError(f"{_where(loaded, index)}: {error}") from None
        key = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append((index, prompt))
    return prompts


def _where(loaded: LoadedSource, index: int) -> str:
    """Record ``index`` of a source for an error message: ``file:line: record i`` or ``source: record i``."""
    line = record_line(loaded.jsonl_file, index) if loaded.jsonl_file else None
    if line is not None:
        return f"{loaded.jsonl_file}:{line}: record {index}"
    return f"{loaded.label}: record {index}"
