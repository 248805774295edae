"""Raw records of one source -> token ids, through ``Dataset.map`` so results are cached on disk.

One ``map`` call normalises and tokenises every record. It keeps one row per record: a pair that gives
no training signal gets empty ids and a ``drop_reason``, so callers can count drops per reason (also on
subsets, e.g. a held-out split) before selecting the kept rows.

Caching: datasets names the output file by a fingerprint of the input dataset and of the pickled map
function. Functions and classes from an importable module are pickled *by name*, so editing the code
below would not change the fingerprint and a stale cache would be reused. The processor therefore
carries a hash of the source of this module and the modules it calls (``CODE_VERSION``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipo_lightning.data import formats
from ipo_lightning.data import tokenize as tokenize_module
from ipo_lightning.data.formats import Dropped, check_columns, detect_format, normalise
from ipo_lightning.data.sources import LoadedSource, record_line
from ipo_lightning.data.tokenize import PairTokenizer
from ipo_lightning.errors import DataError

if TYPE_CHECKING:
    # Types only: datasets (with pandas and pyarrow) loads where data is loaded, not for --help.
    import datasets

DROP_COLUMN = "drop_reason"
PROMPT_COLUMN = "prompt_json"
"""The normalised prompt as JSON (a string, or a list of chat messages), for generation and rewards."""
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@functools.cache
def features() -> datasets.Features:
    """The columns of :func:`tokenize_source`'s output and their types (built once, on first use)."""
    import datasets

    return datasets.Features(
        {
            **{name: datasets.List(datasets.Value("int32")) for name in ID_COLUMNS},
            "preference_prob": datasets.Value("float32"),
            PROMPT_COLUMN: datasets.Value("string"),
            DROP_COLUMN: datasets.Value("string"),
        }
    )


CODE_VERSION = hashlib.sha256(
    b"".join(Path(module).read_bytes() for module in (__file__, formats.__file__, tokenize_module.__file__))
).hexdigest()[:16]


@dataclass
class RecordProcessor:
    """The batched map function: raw records -> token ids or a drop reason, one output row per record.

    Args:
        fmt: ``plain``, ``conversational`` or ``implicit`` (already resolved from ``auto``).
        columns: Canonical field -> source column mapping.
        pair_tokenizer: Tokenises normalised examples.
        source_label: How error messages name the source.
        jsonl_file: The JSONL file of the records, so errors can give line numbers.
    """

    fmt: str
    columns: dict[str, str]
    pair_tokenizer: PairTokenizer
    source_label: str
    jsonl_file: str | None = None
    code_version: str = field(default=CODE_VERSION)
    """Part of the pickled state, so that the cache fingerprint changes with the code."""

    def __call__(self, batch: Mapping[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        """Process a batch of records (column -> values) whose 0-based record numbers are ``indices``."""
        out: dict[str, list[Any]] = {name: [] for name in features()}
        names = list(batch)
        for position, index in enumerate(indices):
            record = {name: batch[name][position] for name in names}
            try:
                example = normalise(record, self.fmt, self.columns)
                result = example if isinstance(example, Dropped) else self.pair_tokenizer(example)
            except DataError as error:
                # `from None`: the record location is the whole story, the inner traceback is noise.
                raise DataError(f"{self.where(index)}: {error}") from None
            if isinstance(result, Dropped):
                for name in ID_COLUMNS:
                    out[name].append([])
                out["preference_prob"].append(1.0)
                out[PROMPT_COLUMN].append("")
                out[DROP_COLUMN].append(result.reason)
            else:
                out["prompt_ids"].append(result.prompt_ids)
                out["chosen_ids"].append(result.chosen_ids)
                out["rejected_ids"].append(result.rejected_ids)
                out["preference_prob"].append(result.preference_prob)
                out[PROMPT_COLUMN].append(json.dumps(example.prompt, ensure_ascii=False))
                out[DROP_COLUMN].append("")
        return out

    def where(self, index: int) -> str:
        """Name record ``index`` for an error message: ``file:line: record i`` or ``source: record i``."""
        line = record_line(self.jsonl_file, index) if self.jsonl_file else None
        if line is not None:
            return f"{self.jsonl_file}:{line}: record {index}"
        return f"{self.source_label}: record {index}"


def resolve_format(loaded: LoadedSource, fmt: str, columns: Mapping[str, str] | None) -> str:
    """The concrete format of a source (``auto`` detected from its columns and values), columns checked."""
    dataset = loaded.dataset
    if len(dataset) == 0:
        raise DataError(f"{loaded.label}: no records")
    resolved = fmt
    if fmt == "auto":
        # Iterate over the two columns detection reads, so no other column is decoded.
        wanted = {formats.column_of(field, columns) for field in ("prompt", "chosen")}
        records = dataset.select_columns([name for name in dataset.column_names if name in wanted])
        resolved = detect_format(dataset.column_names, records, columns)
    try:
        check_columns(dataset.column_names, resolved, columns)
    except DataError as error:
        raise DataError(f"{loaded.label}: {error}") from None
    return resolved


def tokenize_source(
    loaded: LoadedSource,
    pair_tokenizer: PairTokenizer,
    fmt: str = "auto",
    columns: Mapping[str, str] | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Normalise and tokenise every record of ``loaded``; one output row per record, cached by fingerprint.

    Returns:
        A dataset with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``preference_prob``,
        ``prompt_json`` (the normalised prompt, untruncated, as JSON; "" for dropped pairs) and
        ``drop_reason`` ("" for kept pairs, else why the pair gives no training signal).

    Raises:
        DataError: a record is malformed; the message names the source, the record (and line) and field.
    """
    resolved = resolve_format(loaded, fmt, columns)
    processor = RecordProcessor(
        resolved, dict(columns or {}), pair_tokenizer, loaded.label, loaded.jsonl_file
    )
    dataset = loaded.dataset
    return dataset.map(
        processor,
        with_indices=True,
        batched=True,
        remove_columns=dataset.column_names,
        features=features(),
        # More processes than shards of work only costs start-up time.
        num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) >= 2 * num_proc else None,
        desc=f"Tokenising {loaded.label}",
    )


def drop_counts(dataset: datasets.Dataset) -> dict[str, int]:
    """Number of dropped rows per reason in the output of :func:`tokenize_source`."""
    counts: dict[str, int] = {}
    for reason in dataset[DROP_COLUMN]:
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def kept_pairs(dataset: datasets.Dataset) -> datasets.Dataset:
    """The rows of :func:`tokenize_source` output that are training pairs, without ``drop_reason``."""
    reasons = dataset[DROP_COLUMN]
    kept = [row for row, reason in enumerate(reasons) if not reason]
    if len(kept) < len(dataset):
        dataset = dataset.select(kept)
    return dataset.remove_columns(DROP_COLUMN)
