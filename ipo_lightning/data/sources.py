"""Where preference records come from: local files and folders, built-in sets, or the Hugging Face hub.

Everything is loaded through `datasets`, so records live in memory-mapped Arrow files and every later
step (normalising, tokenising) is cached by fingerprint: a second run with the same data and settings
does no work again.
"""

# No ``from __future__ import annotations`` here: for a class whose annotations are strings,
# jsonargparse (the CLI's parser) runs its module's TYPE_CHECKING block to resolve them, which
# would import datasets for every --help. The annotations naming datasets are quoted instead.

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ipo_lightning.builtin import resolve_data_path
from ipo_lightning.errors import ConfigError, DataError

if TYPE_CHECKING:
    # Types only: datasets (with pandas and pyarrow) loads where data is loaded, not for --help.
    import datasets

JSON_SUFFIXES = (".json", ".jsonl")
FILE_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
UTF8_BLOCK = 16 * 1024 * 1024


@dataclass
class DataSource:
    """One set of preference records: a file, a folder, a built-in set or a hub dataset.

    Args:
        path: A local .jsonl/.json/.parquet file, a local folder (a datasets ``save_to_disk`` folder or
            a folder of data files), ``builtin:quickstart/<split>``, ``builtin:gold/<split>[?knobs]``, or
            a Hugging Face hub dataset id.
        split: Split to read from a folder or hub dataset (ignored for a single file).
        subset: Hub dataset configuration (subset) name, if the dataset has several.
        limit: Keep only the first N records (None keeps all).
    """

    path: str
    split: str = "train"
    subset: str | None = None
    limit: int | None = None


def check_source(source: DataSource) -> None:
    """Raise a ConfigError for settings of ``source`` that can never work.

    Not done in ``DataSource.__post_init__``: jsonargparse would bury the message in its own report
    on every type the option accepts.
    """
    if source.limit is not None and source.limit < 1:
        raise ConfigError(f"data source {source.path!r}: limit must be a positive number, got {source.limit}")


@dataclass(frozen=True)
class LoadedSource:
    """Records of one source plus what error messages need to point at a record.

    Attributes:
        dataset: The raw records, one row per record, in source order.
        label: How messages name the source: a file path, or ``id (split X)``.
        jsonl_file: The local line-delimited JSON file the records came from, if any: lets an error
            name the line of a record, not only its index.
    """

    dataset: "datasets.Dataset"
    label: str
    jsonl_file: str | None = None


def load_source(source: DataSource, cache_dir: str | None = None) -> LoadedSource:
    """Load the records of ``source``, truncated to ``source.limit``.

    Raises:
        ConfigError: ``limit`` is below 1.
        DataError: the file is missing, holds malformed JSON (the message names file and line), or the
            dataset or split cannot be loaded.
    """
    check_source(source)
    path = resolve_data_path(source.path)
    local = Path(path).expanduser()
    if local.is_file():
        loaded = _load_file(local, cache_dir)
    elif local.is_dir():
        loaded = _load_folder(local, source.split, cache_dir)
    elif local.suffix.lower() in FILE_SUFFIXES or path.startswith((".", "/", "~")):
        # Looks like a local path, so "not found" beats a confusing hub lookup error.
        raise DataError(f"{path}: data file not found")
    else:
        loaded = _load_hub(path, source.subset, source.split, cache_dir)
    if source.limit is not None and source.limit < len(loaded.dataset):
        # A contiguous range keeps the Arrow table as is and gives a deterministic fingerprint.
        loaded = LoadedSource(loaded.dataset.select(range(source.limit)), loaded.label, loaded.jsonl_file)
    return loaded


def _load_file(file: Path, cache_dir: str | None) -> LoadedSource:
    builder = FILE_SUFFIXES.get(file.suffix.lower())
    import datasets

    if builder is None:
        raise DataError(f"{file}: unsupported data file type {file.suffix!r}; use .jsonl, .json or .parquet")
    if builder == "json":
        # datasets copies invalid UTF-8 into its string columns unchecked; it would only fail when a
        # record is read, with a traceback that names no file.
        check_utf8(file)
    jsonl = str(file) if builder == "json" and is_line_delimited(file) else None
    try:
        dataset = datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=cache_dir)
    except Exception as error:  # datasets wraps parse errors in several types
        if builder != "json":
            raise DataError(f"{file}: cannot be read as {builder}: {error}") from error
        # datasets reports "row N" of an Arrow block, not a line of the file: parse it ourselves to name
        # the malformed line. If every line parses, datasets tripped on valid JSON (datasets 5.2 fails on
        # a column mixing value types, e.g. a number among strings, when the file has blank lines): keep
        # our parse, so the record-level checks can name the bad record and field.
        return LoadedSource(records_dataset(read_json_records(file)), str(file), jsonl)
    return LoadedSource(dataset, str(file), jsonl)


def records_dataset(records: list[dict]) -> "datasets.Dataset":
    """An in-memory dataset of ``records`` whose columns may mix value types (every column is Json)."""
    import datasets

    names = list(dict.fromkeys(name for record in records for name in record))
    features = datasets.Features({name: datasets.Json() for name in names})
    return datasets.Dataset.from_list(records, features=features)


def _load_folder(folder: Path, split: str, cache_dir: str | None) -> LoadedSource:
    label = f"{folder} (split {split})"
    import datasets

    if (folder / datasets.config.DATASET_STATE_JSON_FILENAME).is_file():
        # A single saved Dataset: it has no splits, so `split` does not apply.
        return LoadedSource(datasets.load_from_disk(str(folder)), str(folder))
    if (folder / datasets.config.DATASETDICT_JSON_FILENAME).is_file():
        saved = datasets.load_from_disk(str(folder))
        if split not in saved:
            raise DataError(f"{folder}: no split {split!r} in the saved dataset; splits: {', '.join(saved)}")
        return LoadedSource(saved[split], label)
    for file in sorted(folder.rglob("*")):
        if file.suffix.lower() in JSON_SUFFIXES and file.is_file():
            check_utf8(file)
    try:
        dataset = datasets.load_dataset(str(folder), split=split, cache_dir=cache_dir)
    except Exception as error:
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() in JSON_SUFFIXES and file.is_file():
                read_json_records(file)  # names a malformed line, if that is the problem
        raise DataError(f"{label}: cannot load the data files of this folder: {error}") from error
    return LoadedSource(dataset, label)


def _load_hub(name: str, subset: str | None, split: str, cache_dir: str | None) -> LoadedSource:
    label = f"{name}" + (f" (subset {subset}, split {split})" if subset else f" (split {split})")
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split, cache_dir=cache_dir)
    except Exception as error:  # network, auth, missing split: all one message
        raise DataError(
            f"{label}: not a local file or folder, and loading it as a Hugging Face hub dataset failed: "
            f"{type(error).__name__}: {error}"
        ) from error
    return LoadedSource(dataset, label)


def is_line_delimited(file: Path) -> bool:
    """Whether a JSON file holds one record per line (JSONL), rather than one JSON array."""
    with file.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                return not line.lstrip().startswith("[")
    return True


def record_line(file: str | Path, index: int) -> int | None:
    """1-based line number of record ``index`` (0-based) of a JSONL file: blank lines hold no record."""
    seen = -1
    with Path(file).open(encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return line_no
    return None


def check_utf8(file: Path, block_size: int = UTF8_BLOCK) -> None:
    """Raise a DataError naming the line and byte offset of the first bytes of ``file`` that are not UTF-8.

    Reads the file in blocks cut after a newline (a newline byte never occurs inside a multi-byte
    character), so memory stays bounded and the decoding runs in C at disk speed.
    """
    with file.open("rb") as handle:
        start, lines_before, carry = 0, 0, b""
        while True:
            block = handle.read(block_size)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            chunk, carry = data[:cut], data[cut:]
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as error:
                line_no = lines_before + chunk.count(b"\n", 0, error.start) + 1
                offset = start + error.start
                raise DataError(
                    f"{file}:{line_no}: not valid UTF-8 (byte offset {offset}, byte "
                    f"0x{chunk[error.start]:02x}: {error.reason}); save the file as UTF-8"
                ) from None
            if not block:
                return
            start += len(chunk)
            lines_before += chunk.count(b"\n")


def read_json_records(file: Path) -> list[dict]:
    """Parse a JSON/JSONL file with the standard library; a DataError names the first malformed line.

    Only used after datasets failed to read the file, so speed does not matter here.
    """
    check_utf8(file)
    text = file.read_text(encoding="utf-8")
    if not is_line_delimited(file):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{error.lineno}: malformed JSON: {error}") from None
        if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
            raise DataError(f"{file}: expected a JSON array of objects (or one object per line)")
        return records
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{line_no}: malformed JSON: {error}") from None
        if not isinstance(record, dict):
            raise DataError(f"{file}:{line_no}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records
