"""Training through each batching mode: the same loss curve as padded rows, end to end with a Trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ipo_lightning.batching import check_model_batching
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.errors import ConfigError
from ipo_lightning.module import PreferenceModule
from tests.helpers import polite_pairs, write_jsonl


class _LossRecorder(L.Callback):
    """Keeps the loss of every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _losses(tiny_model_dir: Path, train_file: Path, batching: str, attn: str) -> list[float]:
    L.seed_everything(0)
    module = PreferenceModule(
        str(tiny_model_dir),
        beta=0.5,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        lr_schedule="constant",
        attn_implementation=attn,
        batching=batching,
    )
    recorder = _LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[recorder],
    )
    data = PreferenceDataModule(
        train=DataSource(path=str(train_file)),
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=4,
        seed=0,
    )
    trainer.fit(module, datamodule=data)
    return recorder.losses


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fit_gives_the_padded_loss_curve(tmp_path: Path, tiny_model_dir: Path, attn: str) -> None:
    # Pairs of different prompt and completion lengths, so padding and prompt sharing both matter.
    records = polite_pairs(16)
    for i, record in enumerate(records):
        record["prompt"] = record["prompt"] * (1 + i % 3)
        record["chosen"] = record["chosen"] * (1 + i % 2)
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    padded = _losses(tiny_model_dir, train_file, "padded", attn)
    assert len(padded) == 4 and padded[-1] < padded[0]  # it trains at lr 1e-2, so the curve means something
    for batching in ("padding_free", "prefix_shared"):
        losses = _losses(tiny_model_dir, train_file, batching, attn)
        assert losses == pytest.approx(padded, rel=1e-4, abs=1e-5), batching


def test_prefix_shared_with_flash_attention_is_one_config_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="model.batching=prefix_shared needs a 4D attention mask"):
        PreferenceModule(
            str(tiny_model_dir), attn_implementation="flash_attention_2", batching="prefix_shared"
        )


@pytest.mark.parametrize("batching", ["padding_free", "prefix_shared"])
def test_lora_policy_and_adapters_off_reference_match_padded(tiny_model_dir: Path, batching: str) -> None:
    from ipo_lightning.data.collator import PairwiseCollator
    from ipo_lightning.lora import LoraOptions
    from tests.test_batching import UNEVEN, _pairs

    lora = LoraOptions(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    batch = PairwiseCollator(pad_token_id=0)(_pairs(400, UNEVEN, seed=2))
    losses = {}
    for mode in ("padded", batching):
        module = PreferenceModule(str(tiny_model_dir), lora=lora, reference="lora", batching=mode, beta=0.5)
        module.configure_model()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # non-zero adapters, so policy and reference differ
            for name, parameter in module.policy.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        module.eval()
        with torch.no_grad():
            loss, values = module.forward_pairs(batch)
        losses[mode] = (float(loss), values["logratio/margin"])
    assert losses[batching][1].abs().max() > 1e-2  # the reference really is the base, not the policy
    assert losses[batching][0] == pytest.approx(losses["padded"][0], rel=1e-5)
    assert torch.allclose(losses[batching][1], losses["padded"][1], atol=1e-5)


# ------------------------------------------------------------------ model.batching: auto


class _NoPositionsConfig(PretrainedConfig):
    """Config of a causal LM whose forward takes no position_ids (as some remote-code models)."""

    model_type = "ipo_lightning_test_no_positions"


class NoPositionsLM(PreTrainedModel):
    """A minimal causal LM without position_ids: only its forward's signature matters here."""

    config_class = _NoPositionsConfig
    _supports_sdpa = True

    def __init__(self, config: _NoPositionsConfig) -> None:
        super().__init__(config)
        self.embed = torch.nn.Embedding(16, 4)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        raise AssertionError("not called")


@pytest.fixture
def no_positions_dir(tmp_path: Path) -> Path:
    AutoConfig.register(_NoPositionsConfig.model_type, _NoPositionsConfig, exist_ok=True)
    AutoModelForCausalLM.register(_NoPositionsConfig, NoPositionsLM, exist_ok=True)
    folder = tmp_path / "no_positions"
    NoPositionsLM(_NoPositionsConfig()).save_pretrained(folder)
    return folder


def _auto_log_lines(caplog: pytest.LogCaptureFixture, build) -> tuple[PreferenceModule, list[str]]:
    """The module ``build()`` returns and the INFO lines the auto resolution logged while building it."""
    logger = logging.getLogger("lightning.pytorch")
    # Lightning's logger does not propagate to the root logger (caplog's) when it installed its own handler.
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            module = build()
    finally:
        if attach:
            logger.removeHandler(caplog.handler)
    lines = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.INFO and record.getMessage().startswith("model.batching=auto")
    ]
    return module, lines


@pytest.mark.parametrize(
    ("attn", "expected"),
    [("sdpa", "prefix_shared"), ("eager", "prefix_shared"), ("flash_attention_2", "padding_free")],
)
def test_auto_is_resolved_into_the_hyperparameters(tiny_model_dir: Path, attn: str, expected: str) -> None:
    # No weights are loaded to resolve it, so flash-attention need not be installed.
    module = PreferenceModule(str(tiny_model_dir), attn_implementation=attn)
    assert module.hparams.batching == expected
    if attn == "sdpa":  # the loaded models run the layout they were resolved for
        module.configure_model()
        check_model_batching(module.policy, module.hparams.batching)
        check_model_batching(module.reference.model, module.hparams.batching)


def test_auto_falls_back_to_padded_for_a_model_without_position_ids(
    no_positions_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module, lines = _auto_log_lines(caplog, lambda: PreferenceModule(str(no_positions_dir)))
    assert module.hparams.batching == "padded"
    assert lines == [
        f"model.batching=auto: padded for {no_positions_dir} (NoPositionsLM.forward takes no position_ids)"
    ]
    # An explicit choice keeps its error, once the model is loaded.
    explicit = PreferenceModule(str(no_positions_dir), batching="prefix_shared")
    with pytest.raises(ConfigError, match="model.batching=prefix_shared: NoPositionsLM.forward takes no"):
        explicit.configure_model()


def test_auto_falls_back_for_a_separate_or_precomputed_reference_without_positions(
    tiny_model_dir: Path, no_positions_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"reference_name_or_path": str(no_positions_dir)}
    separate, lines = _auto_log_lines(
        caplog, lambda: PreferenceModule(str(tiny_model_dir), reference="separate", **options)
    )
    assert separate.hparams.batching == "padded"
    assert lines == [
        f"model.batching=auto: padded for {no_positions_dir} (NoPositionsLM.forward takes no position_ids)"
    ]
    caplog.clear()
    # A precomputed reference runs the layout in its one pass before training: it decides too.
    precomputed, lines = _auto_log_lines(
        caplog, lambda: PreferenceModule(str(tiny_model_dir), reference="precomputed", **options)
    )
    assert precomputed.hparams.batching == "padded"
    assert precomputed.reference_spec().batching == "padded"
    assert lines == [
        f"model.batching=auto: padded for {no_positions_dir} (NoPositionsLM.forward takes no position_ids)"
    ]


def test_cli_writes_the_resolved_batching_into_its_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    from ipo_lightning.cli import PreferenceCLI

    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    args = ["--model.model_name_or_path", str(tiny_model_dir), "--data.train.path", str(train)]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs")]
    cli = PreferenceCLI(args=[*args, "--model.attn_implementation", "eager"], run=False)
    assert cli.config.model.batching == "prefix_shared" == cli.model.hparams.batching
    cli = PreferenceCLI(args=[*args, "--model.batching", "padded"], run=False)
    assert cli.config.model.batching == "padded" == cli.model.hparams.batching
