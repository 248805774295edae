"""The LightningDataModule: preference records in, padded pairwise batches out."""

# No ``from __future__ import annotations`` here: for a class whose annotations are strings,
# jsonargparse (the CLI's parser) runs its module's TYPE_CHECKING block to resolve them, which
# would import datasets for every --help. The annotations naming datasets are quoted instead.

import dataclasses
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.data.eval_shards import eval_loaders
from ipo_lightning.data.formats import DATA_FORMATS, DataFormat, validate_columns
from ipo_lightning.data.noise import FLIPPED_COLUMN, check_label_noise, flip_labels
from ipo_lightning.data.preprocess import drop_counts, kept_pairs, tokenize_source
from ipo_lightning.data.sampler import ResumableDistributedSampler, replicas
from ipo_lightning.data.sources import DataSource, LoadedSource, check_source, load_source
from ipo_lightning.data.subset import check_train_size, subset_rows
from ipo_lightning.data.tokenize import PairTokenizer, check_lengths
from ipo_lightning.errors import ConfigError, DataError, UserInputError

if TYPE_CHECKING:
    # Types only: datasets (with pandas and pyarrow) loads where data is loaded, not for --help.
    import datasets

HELD_OUT_NAME = "val"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from files, folders or hub datasets, tokenised and batched for IPO/DPO training.

    Each source is loaded, normalised to ``{prompt, chosen, rejected, preference_prob}``, tokenised
    (chat template for messages) and cached by datasets' fingerprints, so a rerun skips the work. Pairs
    without training signal are dropped, counted per reason in ``dropped`` and reported once.
    ``val_dataloader()`` and ``test_dataloader()`` always return a list, one loader per named set, in the
    order of ``val_set_names`` / ``test_set_names``.

    Args:
        train: Training records.
        val: Named validation sets, e.g. {in_dist: ..., ood: ...}, evaluated in this order.
        test: Named test sets.
        val_fraction: Fraction of the train records held out as a validation set named "val" (listed
            first), drawn with ``seed`` from the raw records, so it does not depend on the tokenizer.
        tokenizer_name_or_path: Tokenizer to load: a local folder, a hub id or a builtin: model.
        format: Record layout: auto (detect from the columns), plain, conversational or implicit.
        columns: Canonical field -> source column, e.g. {prompt: question, chosen: response_j}.
        max_length: Most tokens in prompt + one completion.
        max_prompt_length: Prompts are cut to their last N tokens first; None: no cut (error if too long).
        batch_size: Pairs per training batch (each pair is two rows).
        val_batch_size: Pairs per validation/test batch; None: batch_size.
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenising large sets; None: one.
        cache_dir: datasets cache folder; None: datasets' default (HF_DATASETS_CACHE).
        seed: Seed of the held-out split, the training shuffle and the label noise.
        train_size: Train on this many pairs: the first N of the kept training pairs (after the source's
            limit, the val_fraction split and dropped pairs) in one fixed shuffle that no seed changes,
            so a smaller set is a subset of every larger one (a data-size study). None: all pairs.
        label_noise: Fraction of training pairs (after drops and train_size, val_fraction excluded)
            whose chosen and rejected are swapped, drawn from ``seed``: a robustness test on your own
            data. 0: none.
        trust_remote_code: Allow custom tokenizer code from the tokenizer's repository.
    """

    def __init__(
        self,
        train: DataSource | None = None,
        val: dict[str, DataSource] | None = None,
        test: dict[str, DataSource] | None = None,
        val_fraction: float = 0.0,
        tokenizer_name_or_path: str | None = None,
        format: DataFormat = "auto",
        columns: dict[str, str] | None = None,
        max_length: int = 512,
        max_prompt_length: int | None = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        train_size: int | None = None,
        label_noise: float = 0.0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        # Logged with the module's hyperparameters (hparams.yaml, W&B config), as plain values so
        # hparams.yaml stays loadable with yaml.safe_load.
        self.save_hyperparameters(
            {
                "train": _plain(train),
                "val": _plain(val),
                "test": _plain(test),
                "val_fraction": val_fraction,
                "tokenizer_name_or_path": tokenizer_name_or_path,
                "format": format,
                "columns": columns,
                "max_length": max_length,
                "max_prompt_length": max_prompt_length,
                "batch_size": batch_size,
                "val_batch_size": val_batch_size,
                "seed": seed,
                "train_size": train_size,
                "label_noise": label_noise,
            }
        )
        self.train = train
        self.val = dict(val or {})
        self.test = dict(test or {})
        self.val_fraction = val_fraction
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.format = format
        self.columns = validate_columns(columns)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_dir = cache_dir
        self.seed = seed
        self.train_size = train_size
        self.label_noise = label_noise
        self.trust_remote_code = trust_remote_code
        self._check_config()

        self.tokenizer = self._load_tokenizer() if tokenizer_name_or_path else None
        self.train_dataset: datasets.Dataset | None = None
        self.val_datasets: dict[str, datasets.Dataset] = {}
        self.test_datasets: dict[str, datasets.Dataset] = {}
        self.dropped: dict[str, dict[str, int]] = {}
        """Set name -> drop reason -> number of pairs dropped, filled by ``setup``."""
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches done), from a checkpoint

    def _check_config(self) -> None:
        check_lengths(self.max_length, self.max_prompt_length, prefix="data.")
        for source in [self.train, *self.val.values(), *self.test.values()]:
            if source is not None:
                check_source(source)  # load_source checks again; here it fails before any loading
        check_train_size(self.train_size)
        check_label_noise(self.label_noise)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction > 0 and self.train is None:
            raise ConfigError("data.val_fraction needs data.train to carve the held-out set from")
        if self.val_fraction > 0 and HELD_OUT_NAME in self.val:
            raise ConfigError(
                f"data.val has a set named {HELD_OUT_NAME!r}, the name of the val_fraction held-out set; "
                "rename it"
            )
        for name, value in (("batch_size", self.batch_size), ("val_batch_size", self.val_batch_size)):
            if value < 1:
                raise ConfigError(f"data.{name} must be at least 1, got {value}")
        if self.format not in DATA_FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        assert self.tokenizer_name_or_path is not None
        return load_tokenizer(self.tokenizer_name_or_path, trust_remote_code=self.trust_remote_code)

    @property
    def val_set_names(self) -> list[str]:
        """Names of the validation sets, in the order of ``val_dataloader()``."""
        return ([HELD_OUT_NAME] if self.val_fraction > 0 else []) + list(self.val)

    @property
    def test_set_names(self) -> list[str]:
        """Names of the test sets, in the order of ``test_dataloader()``."""
        return list(self.test)

    @property
    def collator(self) -> PairwiseCollator:
        """The batch collator (pads with the tokenizer's pad token)."""
        return PairwiseCollator(pad_token_id=self._require_tokenizer().pad_token_id)

    def soft_label_sets(self) -> list[str]:
        """Names of the built sets with at least one pair whose ``preference_prob`` is below 1.

        Names are ``train``, ``val/<name>`` and ``test/<name>``, in that order (sets in loader order);
        sets not built yet (see ``setup``) are not looked at.
        """
        built = [("train", self.train_dataset)] if self.train_dataset is not None else []
        built += [(f"val/{name}", dataset) for name, dataset in self.val_datasets.items()]
        built += [(f"test/{name}", dataset) for name, dataset in self.test_datasets.items()]
        return [name for name, dataset in built if len(dataset) and _min_preference_prob(dataset) < 1.0]

    def stage_sets(self, stage: str) -> "dict[str, datasets.Dataset]":
        """The built sets ``stage`` runs on, by label, in loader order.

        ``fit``: ``train`` and ``val/<name>``; ``validate``: ``val/<name>``; ``test``: ``test/<name>``.
        Sets not built yet (see ``setup``) are left out. The labels are those :meth:`attach_columns`
        takes.
        """
        sets = {"train": self.train_dataset} if stage == "fit" and self.train_dataset is not None else {}
        prefix, store = ("test", self.test_datasets) if stage == "test" else ("val", self.val_datasets)
        sets.update({f"{prefix}/{name}": dataset for name, dataset in store.items()})
        return sets

    def attach_columns(self, label: str, columns: Mapping[str, Sequence[float]]) -> None:
        """Give the built set ``label`` (see :meth:`stage_sets`) extra per-pair columns.

        Each column holds one value per pair, in the set's row order; a column of the same name is
        replaced. The collator passes the columns it knows into every batch: this is how a
        precomputed reference's log-probs (``model.reference: precomputed``) travel with the pairs.

        Raises:
            KeyError: no built set has this label.
            ValueError: a column's length is not the set's number of pairs.
        """
        kind, _, name = label.partition("/")
        if label == "train" and self.train_dataset is not None:
            dataset = self.train_dataset
        elif kind in ("val", "test") and name in (store := getattr(self, f"{kind}_datasets")):
            dataset = store[name]
        else:
            raise KeyError(f"no built data set {label!r}; built: {', '.join(self._built_labels()) or 'none'}")
        for column, values in columns.items():
            if len(values) != len(dataset):
                raise ValueError(
                    f"{label}: column {column!r} has {len(values)} values for {len(dataset)} pairs"
                )
        stale = [column for column in columns if column in dataset.column_names]
        if stale:
            dataset = dataset.remove_columns(stale)
        for column, values in columns.items():
            dataset = dataset.add_column(column, list(values))
        if label == "train":
            self.train_dataset = dataset
        else:
            store[name] = dataset

    def _built_labels(self) -> list[str]:
        labels = ["train"] if self.train_dataset is not None else []
        labels += [f"val/{name}" for name in self.val_datasets]
        return labels + [f"test/{name}" for name in self.test_datasets]

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ConfigError("data.tokenizer_name_or_path is not set (normally linked from the model path)")
        return self.tokenizer

    def prepare_data(self) -> None:
        """Load and tokenise every configured set once (on one process per node) to fill the cache.

        ``setup`` then reads the cached results on every process instead of tokenising in parallel.
        With several processes a bad record or option is not raised here: this runs on local rank 0
        only, and the other ranks would wait for it at Lightning's next barrier forever. ``setup``
        meets the same error on every rank instead. (One process raises it here, before any run
        folder exists.)
        """
        if self.tokenizer is None:
            return
        pair_tokenizer = self._pair_tokenizer()
        for source in [self.train, *self.val.values(), *self.test.values()]:
            if source is not None:
                try:
                    tokenize_source(
                        self._load(source), pair_tokenizer, self.format, self.columns, self.num_proc
                    )
                except UserInputError:
                    if self.trainer is not None and self.trainer.world_size > 1:
                        return
                    raise

    def setup(self, stage: str | None = None) -> None:
        """Build the sets the stage needs (fit/validate: train and val; test: test); built sets are kept."""
        self._require_sets(stage)
        if stage in (None, "fit", "validate"):
            if self.train is not None and self.train_dataset is None:
                self._build_train()
            for name, source in self.val.items():
                if name not in self.val_datasets:
                    self.val_datasets[name] = self._build(name, source)
            # Keep the loaders' order equal to val_set_names even if a set was built earlier.
            self.val_datasets = {name: self.val_datasets[name] for name in self.val_set_names}
        if stage in (None, "test"):
            for name, source in self.test.items():
                if name not in self.test_datasets:
                    self.test_datasets[name] = self._build(name, source)

    def _require_sets(self, stage: str | None) -> None:
        """Fail early, by option name, when a stage has nothing to run on."""
        if stage == "fit" and self.train is None:
            raise ConfigError("fit needs training data: set data.train.path")
        if stage == "validate" and not self.val_set_names:
            raise ConfigError("validate needs a validation set: set data.val.<name>.path or val_fraction")
        if stage == "test" and not self.test:
            raise ConfigError("test needs a test set: set data.test.<name>.path")

    def _pair_tokenizer(self) -> PairTokenizer:
        return PairTokenizer(self._require_tokenizer(), self.max_length, self.max_prompt_length)

    def _load(self, source: DataSource) -> LoadedSource:
        return load_source(source, cache_dir=self.cache_dir)

    def _tokenized(self, source: DataSource) -> "datasets.Dataset":
        loaded = self._load(source)
        return tokenize_source(loaded, self._pair_tokenizer(), self.format, self.columns, self.num_proc)

    def _build(self, name: str, source: DataSource) -> "datasets.Dataset":
        return self._finish(name, self._tokenized(source))

    def _build_train(self) -> None:
        assert self.train is not None
        tokenized = self._tokenized(self.train)
        if self.val_fraction > 0:
            train_rows, held_out_rows = held_out_split(len(tokenized), self.val_fraction, self.seed)
            if not train_rows:
                raise DataError(
                    f"train: val_fraction {self.val_fraction} of {len(tokenized)} records leaves no "
                    "training records"
                )
            self.val_datasets[HELD_OUT_NAME] = self._finish(HELD_OUT_NAME, tokenized.select(held_out_rows))
            tokenized = tokenized.select(train_rows)
        train_dataset = self._finish("train", tokenized)
        if self.train_size is not None:
            # Size before noise: a noisy set of N pairs flips round(noise * N) of exactly these pairs.
            train_dataset = train_dataset.select(
                subset_rows(len(train_dataset), self.train_size, source=self.train.path)
            )
            rank_zero_info(f"train: kept {self.train_size} pairs (data.train_size)")
        if self.label_noise > 0:
            train_dataset = flip_labels(train_dataset, self.label_noise, self.seed)
            flipped = sum(train_dataset[FLIPPED_COLUMN])
            rank_zero_info(
                f"train: flipped the labels of {flipped} of {len(train_dataset)} pairs "
                f"(data.label_noise {self.label_noise})"
            )
        self.train_dataset = train_dataset

    def _finish(self, name: str, tokenized: "datasets.Dataset") -> "datasets.Dataset":
        """Count and report the dropped pairs of set ``name``, return the kept ones."""
        counts = drop_counts(tokenized)
        self.dropped[name] = counts
        total, dropped = len(tokenized), sum(counts.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
        if dropped:
            rank_zero_info(f"{name}: dropped {dropped} of {total} pairs: {reasons}")
        if dropped == total:
            raise DataError(f"{name}: no pairs left: all {total} records were dropped ({reasons})")
        return kept_pairs(tokenized)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, this rank's share of each global batch (see the sampler).

        The shuffle order is drawn from ``seed`` and shared by all ranks; after a resume from a
        mid-epoch checkpoint the first iteration starts after the batches already trained on.
        """
        if self.train_dataset is None:
            raise ConfigError(
                "no training data: set data.train" if self.train is None else "call setup('fit') first"
            )
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

    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch, saved in every checkpoint for an exact resume.

        ``batches_done`` counts this epoch's batches whose optimizer step is in the checkpoint (a
        checkpoint saved at a batch end includes that batch; Lightning resumes after it).
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the training order at the checkpoint's position (applied by ``train_dataloader``)."""
        if "epoch" in state_dict:
            self._resume_position = (state_dict["epoch"], state_dict["batches_done"])

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per validation set, in ``val_set_names`` order (a list even for one set).

        Each rank gets an equal share of a set, padded with weight-0 repeats (see
        :mod:`~ipo_lightning.data.eval_shards`), so every pair counts once in the metrics.
        """
        return eval_loaders(
            self.val_datasets, self.val_set_names, "validate", self.trainer, self._loader, self.val_batch_size
        )

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test set, in ``test_set_names`` order (a list even for one set), split over
        ranks as :meth:`val_dataloader` splits a set."""
        return eval_loaders(
            self.test_datasets, self.test_set_names, "test", self.trainer, self._loader, self.val_batch_size
        )

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        sampler: DistributedSampler | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # Every loader's own generator draws its iterator's worker base seed, which would otherwise
            # come from the global torch RNG at each new iterator (each epoch, each validation) and
            # shift the dropout masks after it: a resume, or validating more often, would change training.
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def _plain(value: DataSource | Mapping[str, DataSource] | None) -> dict | None:
    """A source (or named sources) as plain dicts, for logging."""
    if value is None:
        return None
    if isinstance(value, DataSource):
        return dataclasses.asdict(value)
    return {name: dataclasses.asdict(source) for name, source in value.items()}


def _min_preference_prob(dataset: "datasets.Dataset") -> float:
    """Smallest ``preference_prob`` of a non-empty tokenised set, read as one Arrow column."""
    import pyarrow.compute as pc

    return pc.min(dataset.with_format("arrow")["preference_prob"]).as_py()


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def held_out_split(num_records: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split record numbers ``0..num_records-1`` into (train rows, held-out rows), both sorted.

    The held-out set has ``round(fraction * num_records)`` records (at least one), drawn with
    ``random.Random(seed)``, whose output is stable across Python versions for an int seed.
    """
    size = min(num_records, max(1, round(fraction * num_records)))
    held_out = set(random.Random(seed).sample(range(num_records), size))
    train_rows = [row for row in range(num_records) if row not in held_out]
    return train_rows, sorted(held_out)


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name`` (folder, hub id or ``builtin:`` model), EOS as pad when it has none.

    Raises:
        ConfigError: no such folder, or transformers cannot load it (its reason in one line).
    """
    path = resolve_model_path(name)
    local = Path(path).expanduser()
    if not local.exists() and path.startswith((".", "/", "~")):
        # transformers would call it an invalid hub repo id: say what is wrong instead.
        raise ConfigError(f"cannot load the tokenizer of {name!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())  # transformers' messages span several lines
        if local.is_dir() and not any((local / file).is_file() for file in TOKENIZER_FILES):
            reason = f"the folder holds no {' or '.join(TOKENIZER_FILES)}"
        raise ConfigError(f"cannot load the tokenizer of {name!r}: {_shorten(reason)}") from None
    if tokenizer.pad_token is None:
        # Padding positions come from lengths (see PairwiseCollator), so EOS as pad is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
