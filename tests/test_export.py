"""The Hugging Face export's files get the modes of the process umask, like the rest of the run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ipo_lightning.callbacks import HFExport
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.module import PreferenceModule
from tests.helpers import polite_pairs, quiet_trainer, write_jsonl


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_export_honours_the_umask(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    module = PreferenceModule(str(tiny_model_dir), optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    data = PreferenceDataModule(
        train=DataSource(path=str(train)), tokenizer_name_or_path=str(tiny_model_dir), batch_size=4
    )
    export = HFExport()
    trainer = quiet_trainer(tmp_path / "run", max_steps=1, callbacks=[export])
    trainer.fit(module, datamodule=data)
    assert export.export_dir is not None
    previous = os.umask(0o022)
    try:
        for umask, folder_mode, file_mode in [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)]:
            os.umask(umask)
            export.on_fit_end(trainer, module)  # the export again, written under this umask
            modes = _modes(export.export_dir)
            assert modes.pop(".") == folder_mode
            assert "model.safetensors" in modes and "config.json" in modes
            assert modes == {name: file_mode for name in modes}, oct(umask)
    finally:
        os.umask(previous)
    # Still the trained policy, and no staging folder left beside it.
    exported = AutoModelForCausalLM.from_pretrained(export.export_dir)
    torch.testing.assert_close(exported.lm_head.weight, module.policy.lm_head.weight)
    assert [p.name for p in export.export_dir.parent.iterdir() if p.name.startswith(".hf_model")] == []
