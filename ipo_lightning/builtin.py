"""Built-in assets addressed as ``builtin:NAME``, so the quickstart needs no download.

- ``builtin:quickstart/<split>`` is a data source: the JSONL file shipped in
  ``ipo_lightning/quickstart/<split>.jsonl`` (made by ``scripts/make_quickstart_data.py``).
- ``builtin:quickstart`` is a model: a tiny Llama with random weights (fixed seed) and a byte-level
  BPE tokenizer trained on the quickstart texts. It is built on first use into the cache folder
  (``$IPO_LIGHTNING_CACHE``, default ``~/.cache/ipo_lightning``) and then loaded from there with
  ``from_pretrained``, exactly like a hub model. No weights are stored in git.
- ``builtin:gold`` is a model: the reference of the gold-reward task, a tiny Llama trained by SFT
  on the task's demonstrations (:mod:`ipo_lightning.gold.reference`), built on first use into the
  cache folder the same way.
- ``builtin:gold/<split>[?knobs]`` is a data source: preference pairs sampled from ``builtin:gold``
  and labelled by the gold reward (:mod:`ipo_lightning.gold.pairs`), built on first use into the
  cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ipo_lightning.errors import ConfigError

if TYPE_CHECKING:
    from ipo_lightning.gold.reference import ReferenceRecipe

PREFIX = "builtin:"
QUICKSTART_DIR = Path(__file__).parent / "quickstart"
# Bump when the recipe below changes, so stale cached models are not reused.
QUICKSTART_MODEL_VERSION = 1
QUICKSTART_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 256}
QUICKSTART_VOCAB_SIZE = 1024
# Bump when the gold task language or the reference build changes.
GOLD_MODEL_VERSION = 1


def is_builtin(name: str) -> bool:
    """Whether ``name`` addresses a built-in asset."""
    return name.startswith(PREFIX)


def cache_root() -> Path:
    """The folder where built-in models are materialised."""
    return Path(os.environ.get("IPO_LIGHTNING_CACHE", Path.home() / ".cache" / "ipo_lightning"))


def resolve_data_path(path: str) -> str:
    """Map ``builtin:quickstart/<split>`` and ``builtin:gold/<split>[?knobs]`` to a local file.

    Any other path is returned as is. A gold set is built on first use (and the gold reference with it).
    """
    if not is_builtin(path):
        return path
    name = path[len(PREFIX) :]
    collection, _, split = name.partition("/")
    if collection.partition("?")[0] == "gold":
        return str(gold_data_path(name))
    candidate = QUICKSTART_DIR / f"{split}.jsonl"
    if collection != "quickstart" or not candidate.is_file():
        available = sorted(f"{PREFIX}quickstart/{p.stem}" for p in QUICKSTART_DIR.glob("*.jsonl"))
        raise ConfigError(f"unknown built-in data source {path!r}; available: {', '.join(available)}")
    return str(candidate)


def resolve_model_path(name_or_path: str) -> str:
    """Map ``builtin:quickstart`` to a local model folder (built on first use); others unchanged."""
    if not is_builtin(name_or_path):
        return name_or_path
    if name_or_path == f"{PREFIX}gold":
        return str(gold_model_path())
    if name_or_path != f"{PREFIX}quickstart":
        raise ConfigError(
            f"unknown built-in model {name_or_path!r}; available: {PREFIX}quickstart, {PREFIX}gold"
        )
    # The folder name changes with the recipe version and the data the tokenizer is trained on.
    data_hash = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(QUICKSTART_DIR.glob("*.jsonl"))))
    target = cache_root() / f"quickstart-v{QUICKSTART_MODEL_VERSION}-{data_hash.hexdigest()[:8]}"
    if not (target / "config.json").is_file():
        _build_model_folder(target, _save_quickstart_model)
    return str(target)


def gold_model_folder(recipe: ReferenceRecipe | None = None) -> Path:
    """Where the gold reference of ``recipe`` (default: the shipped recipe) lives in the cache.

    The folder name holds a hash of the recipe, so another recipe (e.g. a quicker one in tests)
    gets its own folder.
    """
    from ipo_lightning.gold.reference import ReferenceRecipe

    recipe = recipe or ReferenceRecipe()
    key = json.dumps({"version": GOLD_MODEL_VERSION, **recipe.as_dict()}, sort_keys=True)
    return cache_root() / f"gold-v{GOLD_MODEL_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def gold_model_path(recipe: ReferenceRecipe | None = None) -> Path:
    """The folder of the gold reference built with ``recipe``, built on first use.

    The build (SFT of a tiny Llama, :func:`ipo_lightning.gold.reference.train_reference`) takes
    about a minute and a half on a CPU and happens once per cache folder.
    """
    from ipo_lightning.gold.reference import ReferenceRecipe, train_reference

    recipe = recipe or ReferenceRecipe()
    target = gold_model_folder(recipe)
    if not (target / "config.json").is_file():
        _build_model_folder(target, lambda staging: train_reference(staging, recipe))
    return target


def gold_data_path(name: str, recipe: ReferenceRecipe | None = None) -> Path:
    """The JSONL file of ``gold/<split>[?knobs]`` sampled from the gold reference of ``recipe``.

    The name is validated before anything is built; the set and the reference are built on first use.
    """
    from ipo_lightning.gold.pairs import DATA_VERSION, parse_spec, write_pairs

    spec = parse_spec(name)
    model_dir = gold_model_path(recipe)
    return write_pairs(model_dir, spec, model_dir.parent / f"gold-data-v{DATA_VERSION}-{model_dir.name}")


def quickstart_corpus() -> list[str]:
    """Every prompt and completion text of the shipped quickstart data, in file order."""
    texts: list[str] = []
    for file in sorted(QUICKSTART_DIR.glob("*.jsonl")):
        with file.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    texts.extend(str(record[key]) for key in ("prompt", "chosen", "rejected"))
    return texts


def _save_quickstart_model(directory: Path) -> None:
    from ipo_lightning.tiny import save_tiny_model

    save_tiny_model(directory, quickstart_corpus(), vocab_size=QUICKSTART_VOCAB_SIZE, **QUICKSTART_MODEL)


def _build_model_folder(target: Path, build: Callable[[Path], object]) -> None:
    """Build into a temporary sibling folder, then rename, so a crash never leaves half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first: its copy is identical, keep it.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
