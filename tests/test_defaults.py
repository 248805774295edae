"""Defaults that depend on other options: beta per loss type, and dropout off in the policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ipo_lightning.cli import main
from ipo_lightning.lora import LoraOptions
from ipo_lightning.modeling import DROPOUT_MODULES
from ipo_lightning.module import DPO_DEFAULT_BETA, IPO_DEFAULT_BETA, PreferenceModule, default_beta
from tests.helpers import fit_config, polite_pairs, write_config, write_jsonl


def test_default_beta_puts_the_ipo_target_at_half_a_nat_per_token() -> None:
    assert 1 / (2 * default_beta("ipo")) == 0.5
    assert default_beta("dpo") == default_beta("hinge") == 0.1


@pytest.mark.parametrize(
    ("loss_type", "beta", "expected"),
    [
        ("ipo", None, IPO_DEFAULT_BETA),
        ("dpo", None, DPO_DEFAULT_BETA),
        ("hinge", None, 0.1),
        ("ipo", 0.1, 0.1),
    ],
)
def test_module_resolves_beta_before_saving_hyperparameters(
    tiny_model_dir: Path, loss_type: str, beta: float | None, expected: float
) -> None:
    module = PreferenceModule(str(tiny_model_dir), loss_type=loss_type, beta=beta)
    assert module.hparams.beta == expected


@pytest.mark.parametrize(
    ("model_options", "expected"),
    [({"loss_type": "ipo"}, 1.0), ({"loss_type": "dpo"}, 0.1), ({"loss_type": "ipo", "beta": 0.1}, 0.1)],
    ids=["ipo-default", "dpo-default", "ipo-explicit"],
)
def test_cli_writes_the_resolved_beta_into_config_hparams_and_export(
    tmp_path: Path, tiny_model_dir: Path, model_options: dict, expected: float
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    config = fit_config(
        tmp_path,
        tiny_model_dir,
        train,
        trainer={"max_steps": 1},
        model=model_options,
        data={"batch_size": 4},
        divergence={"enabled": False},
        wandb={"enabled": False},
    )
    main(["fit", "--config", str(write_config(tmp_path / "config.yaml", config))])
    run_dir = tmp_path / "runs" / "version_0"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["beta"] == expected
    assert yaml.safe_load((run_dir / "hparams.yaml").read_text())["beta"] == expected
    info = json.loads((run_dir / "hf_model" / "ipo_lightning.json").read_text())
    assert (info["method"], info["beta"]) == ("preference", expected)


def _llama_with_dropout(tiny_model_dir: Path, target: Path) -> Path:
    """The tiny Llama with attention dropout: a float attribute of each attention module, no nn.Dropout."""
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5).save_pretrained(target)
    return target


def _gpt2_with_dropout(target: Path) -> Path:
    """A tiny GPT-2: its dropouts are nn.Dropout modules (embedding, attention, residual, MLP)."""
    config = GPT2Config(
        vocab_size=400,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.3,
        embd_pdrop=0.3,
        attn_pdrop=0.3,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(target)
    return target


def _dropout_values(model: torch.nn.Module) -> list[float]:
    """Every dropout probability the model's forward can use: modules' p and attention float attributes."""
    values = [module.p for module in model.modules() if isinstance(module, DROPOUT_MODULES)]
    values += [
        m.attention_dropout
        for m in model.modules()
        if isinstance(getattr(m, "attention_dropout", None), float)
    ]
    return values


def _two_train_mode_forwards(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("disable", [True, False])
def test_policy_dropout_is_off_unless_kept(
    tmp_path: Path, tiny_model_dir: Path, family: str, disable: bool
) -> None:
    path = (
        _llama_with_dropout(tiny_model_dir, tmp_path / "m")
        if family == "llama"
        else _gpt2_with_dropout(tmp_path / "m")
    )
    module = PreferenceModule(str(path), disable_dropout=disable, batching="padded")
    module.configure_model()
    values = _dropout_values(module.policy)
    assert values, "the model has no dropout to test"
    first, second = _two_train_mode_forwards(module.policy)
    if disable:
        assert all(value == 0 for value in values)
        assert torch.equal(first, second)  # train mode, yet deterministic: nothing drops out
        # The export writes the config as trained: dropout 0 there too.
        module.policy.save_pretrained(tmp_path / "export")
        saved = json.loads((tmp_path / "export" / "config.json").read_text())
        fields = ["attention_dropout"] if family == "llama" else ["resid_pdrop", "embd_pdrop", "attn_pdrop"]
        assert all(saved[field] == 0 for field in fields)
    else:
        assert all(value > 0 for value in values)
        assert not torch.equal(first, second)
    assert module.hparams.disable_dropout is disable


def test_lora_adapter_dropout_is_its_own_option(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = _llama_with_dropout(tiny_model_dir, tmp_path / "m")
    options = LoraOptions(rank=4, alpha=8.0, dropout=0.25, target_modules=["q_proj", "v_proj"])
    module = PreferenceModule(str(path), lora=options)
    module.configure_model()
    adapter = [
        m.p
        for name, m in module.policy.named_modules()
        if "lora_dropout" in name and isinstance(m, DROPOUT_MODULES)
    ]
    assert adapter and all(p == 0.25 for p in adapter)
    base = [
        m.attention_dropout
        for m in module.policy.modules()
        if isinstance(getattr(m, "attention_dropout", None), float)
    ]
    assert base and all(value == 0 for value in base)


def test_eval_mode_turns_every_module_off_then_restores_each_ones_own_mode() -> None:
    from ipo_lightning.modeling import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model[2].eval()  # mixed modes, as Lightning leaves a frozen part of a module
    before = [module.training for module in model.modules()]
    assert before == [True, True, True, False]
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == before
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("a failed forward")
    assert [module.training for module in model.modules()] == before
