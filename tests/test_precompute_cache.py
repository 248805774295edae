"""The precomputed reference cache file: damaged files are rebuilt, a folder in its place is an error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ipo_lightning.cli import main
from ipo_lightning.errors import ConfigError
from ipo_lightning.precompute import load_cached, save_cached
from tests.helpers import polite_pairs, write_jsonl

KEY = "0123456789abcdef0123456789abcdef"


def _values(num_pairs: int) -> torch.Tensor:
    return torch.arange(num_pairs * 4, dtype=torch.float32).reshape(num_pairs, 4) - 10.5


def test_a_cache_file_is_used_only_with_its_key_shape_and_float32_values(tmp_path: Path) -> None:
    path = tmp_path / f"{KEY}.safetensors"
    save_cached(path, KEY, _values(3), {"set": "train"})
    torch.testing.assert_close(load_cached(path, KEY, 3), _values(3), rtol=0, atol=0)
    assert load_cached(tmp_path / "absent.safetensors", KEY, 3) is None

    damaged = {
        "int64": ({"values": _values(3).long()}, "int64 values, not float32"),
        "float64": ({"values": _values(3).double()}, "float64 values, not float32"),
        "shape": ({"values": _values(2)}, r"shape \(2, 4\) for 3 pairs"),
        "nan": ({"values": _values(3).index_fill(0, torch.tensor([1]), float("nan"))}, "non-finite"),
    }
    for tensors, problem in damaged.values():
        save_file(tensors, str(path), metadata={"key": KEY})
        with pytest.warns(
            UserWarning,
            match=rf"cache {re.escape(str(path))} does not match its key \(.*{problem}.*recomputing",
        ):
            assert load_cached(path, KEY, 3) is None


def test_a_folder_at_the_cache_path_is_one_config_error(tmp_path: Path) -> None:
    path = tmp_path / f"{KEY}.safetensors"
    path.mkdir()
    with pytest.raises(ConfigError) as caught:
        load_cached(path, KEY, 3)
    assert str(caught.value) == (
        f"{path}: expected a reference log-prob cache file there, found a folder or other non-file; "
        "move it away (or point data.cache_dir elsewhere)"
    )


@pytest.mark.slow
def test_fit_rebuilds_an_int64_cache_and_stops_at_a_folder_in_its_place(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(8))
    cache = tmp_path / "cache"
    args = ["fit", "--model.model_name_or_path", str(tiny_model_dir), "--model.reference", "precomputed"]
    args += ["--data.train.path", str(train), "--data.cache_dir", str(cache), "--data.max_length", "64"]
    args += ["--data.max_prompt_length", "32", "--data.batch_size", "4", "--trainer.max_steps", "1"]
    args += ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false"]
    args += ["--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]
    args += ["--wandb.enabled", "false", "--divergence.enabled", "false", "--export.enabled", "false"]

    def read(path: Path) -> tuple[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata()["key"], handle.get_tensor("values")

    main(args)
    (path,) = (cache / "ipo_lightning_reference_logps").glob("*.safetensors")
    key, values = read(path)
    assert values.dtype == torch.float32

    # The same key and shape, int64 values: not what this cache writes, so it is rebuilt.
    save_file({"values": values.long()}, str(path), metadata={"key": key})
    with pytest.warns(UserWarning, match="int64 values, not float32"):
        main(args)
    rebuilt_key, rebuilt = read(path)
    assert rebuilt_key == key and rebuilt.dtype == torch.float32
    torch.testing.assert_close(rebuilt, values)

    path.unlink()
    path.mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {path}: expected a reference log-prob cache file there, found a folder or other non-file; "
        "move it away (or point data.cache_dir elsewhere)"
    ]
