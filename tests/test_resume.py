"""Exact resume: stop at any optimizer step, resume from the checkpoint, get bitwise the same weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.sampler import ResumableDistributedSampler, epoch_permutation
from ipo_lightning.module import PreferenceModule
from ipo_lightning.resume import RNGStateCheckpoint, find_resume_checkpoint
from ipo_lightning.tiny import save_tiny_model
from tests.conftest import CORPUS
from tests.helpers import polite_pairs, write_jsonl

PAIRS, BATCH, EPOCHS = 12, 4, 2  # 3 batches per epoch, 6 optimizer steps


class StopAtStep(Callback):
    """End fit cleanly after optimizer step ``step`` (its checkpoint is saved at that batch's end)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with attention dropout, so the random state matters for an exact resume."""
    directory = tmp_path_factory.mktemp("dropout_model")
    save_tiny_model(directory, CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4)
    config = AutoConfig.from_pretrained(directory)
    config.attention_dropout = 0.3
    config.save_pretrained(directory)
    return directory


def _fit(model_dir: Path, train: Path, root: Path, *, stop_at: int | None, ckpt_path: Path | None):
    L.seed_everything(0)
    module = PreferenceModule(
        str(model_dir),
        beta=0.5,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        warmup_ratio=0.3,
        attn_implementation="eager",  # dropout inside attention, on the torch generator
    )
    data = PreferenceDataModule(
        train=DataSource(path=str(train)),
        tokenizer_name_or_path=str(model_dir),
        max_length=48,
        max_prompt_length=24,
        batch_size=BATCH,
    )
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_last=True, save_top_k=0),
        RNGStateCheckpoint(),
    ]
    if stop_at is not None:
        callbacks.append(StopAtStep(stop_at))
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("stop_at", [2, 3, 4], ids=["mid-epoch-0", "epoch-end", "mid-epoch-1"])
def test_resume_is_bitwise_exact(tmp_path: Path, dropout_model_dir: Path, stop_at: int) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(PAIRS))
    _, straight = _fit(dropout_model_dir, train, tmp_path / "straight", stop_at=None, ckpt_path=None)

    root = tmp_path / "stopped"
    stopped_trainer, _ = _fit(dropout_model_dir, train, root, stop_at=stop_at, ckpt_path=None)
    assert stopped_trainer.global_step == stop_at
    checkpoint = find_resume_checkpoint(root)
    assert checkpoint is not None and checkpoint.name == "last.ckpt"
    resumed_trainer, resumed = _fit(dropout_model_dir, train, root, stop_at=None, ckpt_path=checkpoint)

    assert resumed_trainer.global_step == EPOCHS * PAIRS // BATCH
    for (name, expected), (_, actual) in zip(
        straight.policy.state_dict().items(), resumed.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, actual), name
    # The weights moved (a resume that trained nothing would not be a test).
    start = AutoModelForCausalLM.from_pretrained(dropout_model_dir)
    assert not torch.equal(straight.policy.lm_head.weight, start.lm_head.weight)


def test_sampler_keeps_the_single_process_order_and_deals_global_batches() -> None:
    """World size 1 replays DataLoader(shuffle=True, generator) exactly; ranks split global batches."""
    items, seed = list(range(37)), 5
    loader = DataLoader(items, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for epoch in range(3):
        single = ResumableDistributedSampler(items, batch_size=5, seed=seed)
        single.set_epoch(epoch)
        assert list(single) == [int(i) for batch in loader for i in batch]

    # Two ranks with batch 2: their k-th batches together are the single process's k-th batch of 4.
    permutation = epoch_permutation(len(items), seed, 1)
    ranks = [
        ResumableDistributedSampler(items, batch_size=2, num_replicas=2, rank=r, seed=seed) for r in (0, 1)
    ]
    for sampler in ranks:
        sampler.set_epoch(1)
    per_rank = [list(sampler) for sampler in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 19  # 37 padded to 38: same batches on both ranks
    for k in range(9):
        together = sorted(per_rank[0][2 * k : 2 * k + 2] + per_rank[1][2 * k : 2 * k + 2])
        assert together == sorted(permutation[4 * k : 4 * k + 4])

    # A resume skips the batches already trained on, once, and only in the saved epoch.
    sampler = ResumableDistributedSampler(items, batch_size=2, num_replicas=2, rank=1, seed=seed)
    sampler.set_epoch(1)
    sampler.skip_batches(epoch=1, batches=3)
    assert list(sampler) == per_rank[1][6:]
    assert list(sampler) == per_rank[1]


def test_resuming_a_folder_started_with_another_config_is_refused(tmp_path: Path) -> None:
    """Two different fits sharing a folder name (e.g. one SLURM job) must not resume each other."""
    from ipo_lightning.errors import ConfigError
    from ipo_lightning.resume import check_same_run

    saved = {"model": {"loss_type": "ipo", "beta": 0.5}, "ckpt_path": None, "trainer": {"max_steps": 8}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_same_run(tmp_path, {**saved, "ckpt_path": "x.ckpt"})  # the very same run (a requeue) resumes
    with pytest.raises(ConfigError, match=r"model.loss_type='ipo', this run has model.loss_type='dpo'"):
        check_same_run(tmp_path, {**saved, "model": {"loss_type": "dpo", "beta": 0.5}})
    check_same_run(tmp_path / "fresh", saved)  # a folder without config.yaml: nothing to compare
