"""Precomputed reference log-probs: one pass of the reference before training, cached on disk.

With ``model.reference: precomputed`` the reference model never runs during training. In the
module's ``setup`` (after the data module has built its sets, before the policy is loaded), every
set the stage uses (fit: train and val; validate: val; test: test) gets four extra columns, per
pair: the reference's completion log-prob *sum* and scored *token count* for chosen and rejected.
Sums and counts (not one normalised value) so that ``length_normalize`` applies in the module,
either way, from the same cache. The collator passes them into the batch
(:data:`ipo_lightning.reference.PRECOMPUTED_KEYS`).

The cache holds one safetensors file per (reference, set) and its name is a hash of everything the
values depend on:

- the reference's weights: a content hash of its ``config.json`` and ``*.safetensors`` files (a hub
  model: its id and snapshot commit);
- how it runs: weight dtype, attention kernel, batching mode, the trainer's precision (autocast),
  the versions of torch and transformers, and the source of this module and of the scoring modules
  (:mod:`ipo_lightning.batching`, :mod:`ipo_lightning.logprobs`);
- the pairs themselves: a hash of the token ids of every pair, in order. That covers the data files
  and their content, the tokenizer and every tokenisation setting at once: whatever changes a token
  changes the key, and nothing that leaves every token unchanged forces a recompute.

So a changed reference or changed data is a different file (a miss, computed afresh), never a stale
hit. A file that exists but does not hold what its name promises (the key stored inside, the number
of pairs, the columns) is reported and recomputed. Files are written to a temporary name and renamed,
so an interrupted pass never leaves a file that looks finished.

The pass scores through the training path itself (:func:`ipo_lightning.batching.batch_scores`,
in the run's ``model.batching`` mode), so a pair scored in the same batch as training sees gets
exactly the value the live reference would give it; pairs batched differently differ only by float
rounding (the width a row is padded or packed to changes the kernels' summation order).

Under DDP every rank scores every ``world_size``-th pair, the shards are all-gathered, and the ranks
with local rank 0 write the file before a barrier: every rank trains with the complete values. The
reference is then deleted; only the policy stays in memory.
"""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
import transformers
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from ipo_lightning import batching as batching_module
from ipo_lightning import logprobs as logprobs_module
from ipo_lightning.batching import Batching, batch_scores, check_model_batching
from ipo_lightning.builtin import cache_root, resolve_model_path
from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.data.datamodule import PreferenceDataModule
from ipo_lightning.errors import ConfigError
from ipo_lightning.modeling import load_causal_lm
from ipo_lightning.reference import REF_CHOSEN_COUNT, REF_CHOSEN_SUM, REF_REJECTED_COUNT, REF_REJECTED_SUM

if TYPE_CHECKING:
    # Types only: datasets (with pandas and pyarrow) loads where data is loaded, not for --help.
    import datasets

# Editing how log-probs are computed must invalidate every cache file (as preprocess.CODE_VERSION does).
CODE_VERSION = hashlib.sha256(
    b"".join(
        Path(module).read_bytes() for module in (__file__, batching_module.__file__, logprobs_module.__file__)
    )
).hexdigest()[:16]
COLUMNS = (REF_CHOSEN_SUM, REF_CHOSEN_COUNT, REF_REJECTED_SUM, REF_REJECTED_COUNT)
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
WEIGHT_FILE_PATTERNS = ("config.json", "*.safetensors")
_HASH_BLOCK = 16 * 1024 * 1024


@dataclass(frozen=True)
class ReferenceSpec:
    """How the reference model is loaded for the pass (and part of the cache key).

    Attributes:
        name_or_path: hub id, local folder or ``builtin:`` name.
        dtype: weight dtype.
        attn_implementation: attention kernel passed to ``from_pretrained``.
        trust_remote_code: allow model code from the hub.
        batching: how the pairs' rows are laid out for the reference (``model.batching``).
    """

    name_or_path: str
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    batching: Batching = "padded"


@dataclass
class PrecomputeReport:
    """What the last :func:`prepare_precomputed_reference` did, per set label (``train``, ``val/x``)."""

    hits: list[str] = field(default_factory=list)
    """Sets whose values came from the cache."""
    computed: list[str] = field(default_factory=list)
    """Sets scored by the reference in this run."""
    files: dict[str, Path] = field(default_factory=dict)
    """Cache file of each set."""


# ------------------------------------------------------------------ keys


def _hash_file(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)


def reference_identity(name_or_path: str) -> str:
    """A string that changes whenever the reference's weights or config change.

    A local folder (or ``builtin:`` model): the sha256 of its ``config.json`` and ``*.safetensors``
    files, names and contents (about 1 s per GB). A hub id: ``hub:<id>@<commit>`` of the snapshot that
    ``from_pretrained`` resolves, which pins the files just as well and reads nothing.
    """
    path = resolve_model_path(name_or_path)
    folder = Path(path).expanduser()
    if folder.is_dir():
        files = sorted({file for pattern in WEIGHT_FILE_PATTERNS for file in folder.glob(pattern)})
        if not files:
            raise ConfigError(
                f"reference {name_or_path!r}: no config.json or *.safetensors files in {folder}"
            )
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            _hash_file(digest, file)
        return "sha256:" + digest.hexdigest()
    config_file = transformers.utils.cached_file(path, "config.json")
    snapshot = Path(config_file).parent
    return f"hub:{path}@{snapshot.name}"


def pairs_fingerprint(dataset: datasets.Dataset) -> str:
    """sha256 of the token ids of every pair, in row order (see module docstring)."""
    import pyarrow.compute as pc

    table = dataset.select_columns(list(ID_COLUMNS)).with_format("arrow")[0 : len(dataset)]
    digest = hashlib.sha256(f"{len(dataset)}\0".encode())
    for name in ID_COLUMNS:
        column = table.column(name).combine_chunks()
        # Lengths and flat values: independent of Arrow's chunking and offsets.
        digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype("int64").tobytes())
        digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return digest.hexdigest()


def cache_key(identity: str, spec: ReferenceSpec, precision: str, data_fingerprint: str) -> str:
    """The cache file's name: a hash of everything the reference log-probs depend on."""
    parts = [
        f"reference={identity}",
        f"dtype={spec.dtype}",
        f"attn={spec.attn_implementation}",
        f"batching={spec.batching}",
        f"precision={precision}",
        f"torch={torch.__version__}",
        f"transformers={transformers.__version__}",
        f"code={CODE_VERSION}",
        f"pairs={data_fingerprint}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cache_folder(data_cache_dir: str | None) -> Path:
    """``<data.cache_dir>/ipo_lightning_reference_logps``, else ``$IPO_LIGHTNING_CACHE/reference_logps``."""
    if data_cache_dir:
        return Path(data_cache_dir).expanduser() / "ipo_lightning_reference_logps"
    return cache_root() / "reference_logps"


# ------------------------------------------------------------------ cache files


def load_cached(path: Path, key: str, num_pairs: int) -> Tensor | None:
    """The [num_pairs, 4] values of cache file ``path``, or None if absent or not what ``key`` promises.

    A file that exists but fails a check (unreadable, another key, another shape, a dtype other than
    float32, a non-finite value) is reported (and then rebuilt by the caller): it is never used.

    Raises:
        ConfigError: something other than a file (e.g. a folder) is at ``path``: it is not ours to delete.
    """
    if path.exists() and not path.is_file():
        raise ConfigError(
            f"{path}: expected a reference log-prob cache file there, found a folder or other non-file; "
            "move it away (or point data.cache_dir elsewhere)"
        )
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored_key = (handle.metadata() or {}).get("key")
            values = handle.get_tensor("values")
    except (OSError, SafetensorError, KeyError) as error:
        rank_zero_warn(f"reference log-prob cache {path} is unreadable ({error}); recomputing it")
        return None
    problem = None
    if stored_key != key or tuple(values.shape) != (num_pairs, len(COLUMNS)):
        problem = f"stored key {stored_key}, shape {tuple(values.shape)} for {num_pairs} pairs"
    elif values.dtype != torch.float32:
        # save_cached writes float32 only: any other dtype is not a file this module wrote.
        problem = f"{str(values.dtype).removeprefix('torch.')} values, not float32"
    elif not values.isfinite().all():
        problem = "non-finite values"
    if problem is not None:
        rank_zero_warn(f"reference log-prob cache {path} does not match its key ({problem}); recomputing it")
        return None
    return values


def save_cached(path: Path, key: str, values: Tensor, description: dict[str, str]) -> None:
    """Write ``values`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({"values": values.contiguous().cpu()}, temporary, metadata={"key": key, **description})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# ------------------------------------------------------------------ the pass


def longest_first(dataset: datasets.Dataset, indices: Sequence[int]) -> list[int]:
    """Positions in ``indices`` in the order :func:`score_pairs` scores them: longest row first (a
    stable sort, so equally long pairs keep their order); its batches are consecutive runs of these."""
    lengths = [
        len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        for row in dataset.select_columns(list(ID_COLUMNS)).select(indices)
    ]
    return sorted(range(len(indices)), key=lambda position: -lengths[position])


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    dataset: datasets.Dataset,
    indices: Sequence[int],
    *,
    collate: Callable[[list[dict]], dict[str, Tensor]],
    batch_size: int,
    device: torch.device,
    batching: Batching = "padded",
    chunk_size: int = 1024,
    forward_context: Callable[[], object] | None = None,
    progress: tqdm | None = None,
) -> Tensor:
    """[len(indices), 4] float32: chosen sum, chosen count, rejected sum, rejected count per pair.

    Pairs are scored longest first (less padding per batch, and an out-of-memory error shows at the
    first batch), then put back in the order of ``indices``. Each batch is scored as training scores
    it (:func:`~ipo_lightning.batching.batch_scores` in mode ``batching``).
    """
    order = longest_first(dataset, indices)
    out = torch.empty(len(indices), len(COLUMNS), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        rows_of_batch = [dataset[indices[position]] for position in positions]
        # Token ids only: the collator must not see (stale) reference columns of an earlier pass.
        features = [{name: row[name] for name in ID_COLUMNS} for row in rows_of_batch]
        batch = {key: value.to(device) for key, value in collate(features).items()}
        rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        context = forward_context() if forward_context is not None else torch.autocast("cpu", enabled=False)
        with context:
            scores = batch_scores(model, *rows, batching=batching, chunk_size=chunk_size)
        sums, counts = scores.sums.float(), scores.counts.float()
        half = len(positions)
        values = torch.stack([sums[:half], counts[:half], sums[half:], counts[half:]], dim=1)
        out[positions] = values.float().cpu()
        if progress is not None:
            progress.update(len(positions))
    return out


def _gather_shards(trainer: L.Trainer, shard: Tensor, num_pairs: int) -> Tensor:
    """Reassemble the strided shards of all ranks (rank r holds pairs r, r + W, r + 2W, ...)."""
    world = trainer.world_size
    if world == 1:
        return shard
    per_rank = -(-num_pairs // world)
    padded = torch.zeros(per_rank, shard.shape[1], dtype=shard.dtype)
    padded[: shard.shape[0]] = shard
    gathered = trainer.strategy.all_gather(padded.to(trainer.strategy.root_device)).cpu()  # [W, m, 4]
    return gathered.permute(1, 0, 2).reshape(-1, shard.shape[1])[:num_pairs]


def prepare_precomputed_reference(
    trainer: L.Trainer, spec: ReferenceSpec, stage: str, *, chunk_size: int = 1024
) -> PrecomputeReport:
    """Give every set of ``stage`` its reference columns, from the cache or one reference pass.

    Collective under DDP: every rank must call it (Lightning's ``setup`` hook does).

    Raises:
        ConfigError: the trainer's data module is not a PreferenceDataModule.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if not isinstance(datamodule, PreferenceDataModule):
        raise ConfigError(
            "model.reference=precomputed needs the data as a PreferenceDataModule (passed to the Trainer), "
            "whose sets it scores once before training"
        )
    report = PrecomputeReport()
    sets = datamodule.stage_sets(stage)
    if not sets:
        return report
    identity = reference_identity(spec.name_or_path)
    folder = cache_folder(getattr(datamodule, "cache_dir", None))
    precision = str(trainer.precision)
    strategy = trainer.strategy
    model: nn.Module | None = None
    try:
        for label, dataset in sets.items():
            key = cache_key(identity, spec, precision, pairs_fingerprint(dataset))
            path = folder / f"{key}.safetensors"
            report.files[label] = path
            values = load_cached(path, key, len(dataset))
            # One decision for all ranks: if any rank misses (e.g. a node without the file), all compute.
            if strategy.reduce_boolean_decision(values is not None, all=True):
                report.hits.append(label)
                rank_zero_info(f"Reference log-probs of {label} ({len(dataset)} pairs): cached, {path}")
            else:
                if model is None:
                    model = _load_reference(spec, strategy.root_device)
                started = time.perf_counter()
                values = _compute(trainer, model, datamodule, label, dataset, spec.batching, chunk_size)
                elapsed = time.perf_counter() - started
                if trainer.local_rank == 0:  # one writer per node: also right without a shared disk
                    save_cached(path, key, values, {"reference": spec.name_or_path, "set": label})
                strategy.barrier("ipo_lightning.precompute")
                report.computed.append(label)
                rank_zero_info(
                    f"Reference log-probs of {label}: {len(dataset)} pairs in {elapsed:.1f} s "
                    f"({len(dataset) / max(elapsed, 1e-9):.1f} pairs/s, {trainer.world_size} process(es)), "
                    f"cached in {path}"
                )
            datamodule.attach_columns(label, {name: values[:, i].tolist() for i, name in enumerate(COLUMNS)})
    finally:
        # The point of precomputing: training holds the policy only.
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report


def _load_reference(spec: ReferenceSpec, device: torch.device) -> nn.Module:
    model = load_causal_lm(
        spec.name_or_path,
        dtype=spec.dtype,
        attn_implementation=spec.attn_implementation,
        trust_remote_code=spec.trust_remote_code,
    )
    model.requires_grad_(False)
    check_model_batching(model, spec.batching)
    return model.eval().to(device)  # eval: every dropout off during the pass


def _compute(
    trainer: L.Trainer,
    model: nn.Module,
    datamodule: object,
    label: str,
    dataset: datasets.Dataset,
    batching: Batching,
    chunk_size: int,
) -> Tensor:
    """Score this rank's shard with a progress bar (rank 0) and gather all shards."""
    indices = list(range(trainer.global_rank, len(dataset), trainer.world_size))
    show = trainer.is_global_zero and trainer.progress_bar_callback is not None
    with tqdm(
        total=len(indices),
        desc=f"Reference log-probs ({label})",
        unit=" pairs",
        disable=not show,
        dynamic_ncols=True,
        leave=True,
    ) as progress:
        shard = score_pairs(
            model,
            dataset,
            indices,
            # The collator's plain rows: the values are per pair, so the reference columns of an
            # earlier pass must not reach it; `batching` then lays them out as training does.
            collate=PairwiseCollator(pad_token_id=datamodule.tokenizer.pad_token_id),
            batch_size=datamodule.val_batch_size,
            device=trainer.strategy.root_device,
            batching=batching,
            chunk_size=chunk_size,
            forward_context=trainer.precision_plugin.forward_context,
            progress=progress,
        )
    return _gather_shards(trainer, shard, len(dataset))
