"""PreferenceModule trained with a real Trainer on a tiny saved model: reference, fixed point, export."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.module import PreferenceModule
from tests.helpers import polite_pairs, quiet_trainer, write_jsonl


def _datamodule(tiny_model_dir: Path, train_file: Path, batch_size: int) -> PreferenceDataModule:
    return PreferenceDataModule(
        train=DataSource(path=str(train_file)),
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=batch_size,
    )


def _constant_adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def test_reference_untouched_and_not_checkpointed(tmp_path: Path, tiny_model_dir: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", polite_pairs(16))
    module = PreferenceModule(str(tiny_model_dir), optimizer=_constant_adam(1e-2), lr_schedule="constant")
    module.configure_model()
    before = {k: v.clone() for k, v in module.reference.model.state_dict().items()}
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}

    trainer = quiet_trainer(tmp_path, max_steps=6, enable_checkpointing=True)
    trainer.fit(module, datamodule=_datamodule(tiny_model_dir, train_file, batch_size=4))

    # Reference: bitwise equal, frozen, in eval mode, outside the optimizer.
    after = module.reference.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not module.reference.training and not any(m.training for m in module.reference.modules())
    assert not any(p.requires_grad for p in module.reference.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in module.reference.parameters())
    assert optimized == {id(p) for p in module.policy.parameters()}
    # The policy did move (otherwise the checks above prove nothing).
    assert any(not torch.equal(policy_before[k], v) for k, v in module.policy.state_dict().items())

    # The checkpoint holds one model: the policy.
    checkpoint_path = trainer.checkpoint_callback.best_model_path
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(key.startswith("policy.") for key in state)
    assert len(state) == len(module.policy.state_dict())

    # Loading it back (strictly) restores the policy and reloads the original reference.
    restored = PreferenceModule.load_from_checkpoint(checkpoint_path)
    for key, value in module.policy.state_dict().items():
        assert torch.equal(restored.policy.state_dict()[key], value)
    for key, value in before.items():
        assert torch.equal(restored.reference.model.state_dict()[key], value)


def _train_and_measure_margin(tmp_path: Path, tiny_model_dir: Path, loss_type: str, beta: float) -> float:
    L.seed_everything(0)
    train_file = write_jsonl(tmp_path / f"{loss_type}.jsonl", polite_pairs(4))
    datamodule = _datamodule(tiny_model_dir, train_file, batch_size=4)
    module = PreferenceModule(
        str(tiny_model_dir),
        loss_type=loss_type,
        beta=beta,
        length_normalize=True,  # same units for both losses, so the margins compare directly
        optimizer=_constant_adam(1e-2),
        lr_schedule="constant",
        warmup_ratio=0.0,
    )
    # By step 100 the IPO margin is within 1e-4 of its target and the DPO one past 15 (5x the bound below).
    quiet_trainer(tmp_path, max_steps=100).fit(module, datamodule=datamodule)
    module.eval()
    with torch.no_grad():
        _, values = module.forward_pairs(next(iter(datamodule.train_dataloader())))
    return float(values["logratio/margin"].mean())


@pytest.mark.slow
def test_ipo_settles_at_its_fixed_point_while_dpo_keeps_growing(tmp_path: Path, tiny_model_dir: Path) -> None:
    beta = 0.5
    target = 1 / (2 * beta)
    ipo_margin = _train_and_measure_margin(tmp_path, tiny_model_dir, "ipo", beta)
    dpo_margin = _train_and_measure_margin(tmp_path, tiny_model_dir, "dpo", beta)
    assert ipo_margin == pytest.approx(target, rel=0.05)
    assert dpo_margin > 3 * target


def test_fit_resumes_from_a_checkpoint_without_reference_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", polite_pairs(16))

    def module() -> PreferenceModule:
        return PreferenceModule(str(tiny_model_dir), optimizer=_constant_adam(1e-2), lr_schedule="constant")

    first = quiet_trainer(tmp_path / "a", max_steps=3, enable_checkpointing=True)
    first.fit(module(), datamodule=_datamodule(tiny_model_dir, train_file, batch_size=4))
    checkpoint = first.checkpoint_callback.best_model_path

    resumed_module = module()
    steps_run = []

    class CountSteps(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            steps_run.append(1)

    resumed = quiet_trainer(tmp_path / "b", max_steps=6, callbacks=[CountSteps()])
    resumed.fit(
        resumed_module, datamodule=_datamodule(tiny_model_dir, train_file, batch_size=4), ckpt_path=checkpoint
    )
    assert resumed.global_step == 6
    assert len(steps_run) == 3  # it went on from step 3, it did not start over
    # The reference came from its path again, not from the (reference-free) checkpoint.
    original = PreferenceModule(str(tiny_model_dir))
    original.configure_model()
    for key, value in original.reference.model.state_dict().items():
        assert torch.equal(resumed_module.reference.model.state_dict()[key], value)


def test_train_metrics_cover_every_micro_batch_of_an_optimizer_step(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from ipo_lightning.tiny import save_tiny_model
    from tests.conftest import CORPUS

    # A reference different from the policy, so each pair has its own loss; lr 0 keeps the weights.
    reference_dir = save_tiny_model(
        tmp_path / "reference", CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, seed=1
    )
    train_file = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    datamodule = _datamodule(tiny_model_dir, train_file, batch_size=2)
    module = PreferenceModule(
        str(tiny_model_dir), reference_name_or_path=str(reference_dir), optimizer=_constant_adam(0.0)
    )
    logger = CSVLogger(tmp_path / "logs", name="")
    trainer = quiet_trainer(
        tmp_path, max_steps=1, accumulate_grad_batches=2, logger=logger, log_every_n_steps=1
    )
    trainer.fit(module, datamodule=datamodule)

    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    logged = [row for row in rows if row.get("train/loss")]
    assert len(logged) == 1  # one optimizer step, one row

    # Independently: all four pairs in one batch, scored with the (unchanged) weights.
    everything = datamodule.collator([datamodule.train_dataset[i] for i in range(4)])
    module.eval()
    with torch.no_grad():
        loss, values = module.forward_pairs(everything)
    assert float(logged[0]["train/loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(logged[0]["train/logratio/margin"]) == pytest.approx(
        float(values["logratio/margin"].mean()), rel=1e-5, abs=1e-6
    )


def test_the_default_optimizer_is_fused_adamw_for_plain_parameters(tiny_model_dir: Path) -> None:
    """Without ``model.optimizer``: AdamW(lr=1e-6, weight_decay=0) with the fused kernel on a CPU."""
    from ipo_lightning.module import DEFAULT_LR, default_optimizer

    module = PreferenceModule(str(tiny_model_dir))
    module.configure_model()
    params = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = default_optimizer(params)
    group = optimizer.param_groups[0]
    assert group["fused"] is True and group["lr"] == DEFAULT_LR and group["weight_decay"] == 0.0
    # A parameter that is not a plain nn.Parameter (a sharded or flat one) keeps the loop version.
    flat = torch.nn.Parameter(torch.zeros(3))
    flat.ds_id = 0  # how DeepSpeed marks its partitioned parameters
    assert not default_optimizer([flat]).param_groups[0]["fused"]
