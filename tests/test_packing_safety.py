"""Packed rows for models whose layers ignore the attention mask: detected from the config and refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import (
    FalconH1Config,
    Gemma2Config,
    GraniteMoeHybridConfig,
    JambaConfig,
    Lfm2Config,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
    MiniMaxConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    RecurrentGemmaConfig,
    RwkvConfig,
    ZambaConfig,
)

from ipo_lightning.batching import BatchingTarget, batch_scores, check_model_batching, resolve_batching
from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.errors import ConfigError
from ipo_lightning.module import PreferenceModule
from ipo_lightning.packing_safety import packing_unsafe_reason
from tests.helpers import polite_pairs, run_main, write_jsonl
from tests.test_batching import UNEVEN, _pairs

TINY = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2}
LINEAR = "'linear_attention' (linear-attention / state-space layers)"


def _qwen3_next(layer_types: list[str]) -> Qwen3NextConfig:
    return Qwen3NextConfig(
        **TINY,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        layer_types=layer_types,
    )


UNSAFE = {
    "qwen3_next": (
        lambda: _qwen3_next(["linear_attention", "full_attention"]),
        f"layer_types lists {LINEAR}",
    ),
    "jamba": (lambda: JambaConfig(**TINY, attn_layer_period=2, attn_layer_offset=1), LINEAR),
    "mamba": (lambda: MambaConfig(**TINY), LINEAR),
    "mamba2": (lambda: Mamba2Config(**TINY, num_heads=4, head_dim=16), LINEAR),
    "falcon_h1": (
        lambda: FalconH1Config(**TINY),
        "'hybrid' (attention combined with state-space or convolution layers)",
    ),
    # Its older layer names ("mamba", "attention") are read into the layer_types convention.
    "granitemoehybrid": (
        lambda: GraniteMoeHybridConfig(**TINY, mamba_n_heads=4, layer_types=["mamba", "attention"]),
        LINEAR,
    ),
    "zamba": (lambda: ZambaConfig(**{**TINY, "num_hidden_layers": 3}), LINEAR),
    "lfm2_conv": (lambda: Lfm2Config(**TINY, full_attn_idxs=[1]), "'conv' (short-convolution layers)"),
    "recurrent_gemma": (lambda: RecurrentGemmaConfig(**TINY), LINEAR),
    "minimax": (lambda: MiniMaxConfig(**TINY), LINEAR),
    "rwkv": (lambda: RwkvConfig(vocab_size=64, hidden_size=32), "model type 'rwkv' has RWKV time-mixing"),
    # A remote-code hybrid that lists no layer kinds, only its state-space fields.
    "remote_code": (lambda: PretrainedConfig(mamba_d_state=16), "state-space / linear-attention fields"),
}


@pytest.mark.parametrize("name", list(UNSAFE))
def test_layers_that_mix_tokens_outside_attention_are_named(name: str) -> None:
    build, expected = UNSAFE[name]
    reason = packing_unsafe_reason(build())
    assert reason is not None and expected in reason, reason


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY),
        Qwen2Config(**TINY),
        Gemma2Config(**TINY),  # sliding and full attention: both masks honour the restarting positions
        Lfm2Config(**TINY),  # every layer attention (full_attn_idxs default): no convolution layers
        _qwen3_next(["full_attention", "full_attention"]),
    ],
    ids=["llama", "qwen2", "gemma2", "lfm2_all_attention", "qwen3_next_all_attention"],
)
def test_attention_only_models_may_pack(config: PretrainedConfig) -> None:
    assert packing_unsafe_reason(config) is None


def test_an_unknown_layer_kind_counts_as_unsafe() -> None:
    config = PretrainedConfig(layer_types=["full_attention", "retention"])  # as a remote-code config may
    reason = packing_unsafe_reason(config)
    assert (
        reason == "its config's layer_types lists 'retention', a layer kind not known to keep sequences apart"
    )


def test_packing_really_leaks_through_linear_attention() -> None:
    """Why the refusal exists: a tiny Qwen3-Next (Gated DeltaNet + attention) scores packed rows
    differently from padded ones, while an attention-only model agrees to 1e-5 (test_batching.py)."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(_qwen3_next(["linear_attention", "full_attention"])).eval()
    batch = PairwiseCollator(pad_token_id=0)(_pairs(64, UNEVEN))
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        padded = batch_scores(model, *rows, batching="padded").token_logps
        packed = batch_scores(model, *rows, batching="padding_free").token_logps
    assert (packed - padded).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="Qwen3NextForCausalLM cannot run packed rows: its config's layer"):
        check_model_batching(model, "padding_free")
    check_model_batching(model, "padded")


def test_auto_resolves_to_padded_and_an_explicit_packing_mode_is_refused() -> None:
    from transformers import LlamaForCausalLM

    reason = packing_unsafe_reason(_qwen3_next(["linear_attention", "full_attention"]))
    hybrid = BatchingTarget(
        name="hybrid", model_class=LlamaForCausalLM, attention="sdpa", packing_unsafe=reason
    )
    plain = BatchingTarget(name="plain", model_class=LlamaForCausalLM, attention="sdpa")
    assert resolve_batching("auto", [plain, hybrid]) == "padded"
    assert resolve_batching("padded", [hybrid]) == "padded"
    for mode in ("padding_free", "prefix_shared"):
        with pytest.raises(ConfigError, match=f"^model.batching={mode}: hybrid cannot run packed rows: its"):
            resolve_batching(mode, [plain, hybrid])


@pytest.fixture
def hybrid_dir(tmp_path: Path) -> Path:
    """A folder holding only a tiny Qwen3-Next config.json: resolution reads no weights."""
    folder = tmp_path / "qwen3_next"
    _qwen3_next(["linear_attention", "full_attention"]).save_pretrained(folder)
    return folder


def test_auto_logs_why_it_picked_padded(hybrid_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)  # Lightning's logger may not propagate to caplog's root handler
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            module = PreferenceModule(str(hybrid_dir))
    finally:
        logger.removeHandler(caplog.handler)
    assert module.hparams.batching == "padded"
    lines = {r.getMessage() for r in caplog.records if r.getMessage().startswith("model.batching=auto")}
    assert lines == {
        f"model.batching=auto: padded for {hybrid_dir} (it cannot run packed rows: its config's layer_types "
        f"lists {LINEAR}, which carry state from one packed sequence into the next)"
    }


@pytest.mark.parametrize("reference", ["policy", "separate_reference"])
def test_cli_refuses_packing_a_hybrid_with_one_line(
    tmp_path: Path,
    tiny_model_dir: Path,
    hybrid_dir: Path,
    reference: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI's own resolution: a hybrid policy, or a hybrid separate reference, under padding_free."""
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    policy, other = (hybrid_dir, None) if reference == "policy" else (tiny_model_dir, hybrid_dir)
    args = ["fit", "--model.model_name_or_path", str(policy), "--data.train.path", str(train)]
    args += ["--model.batching", "padding_free"]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs")]
    if other is not None:
        args += ["--model.reference_name_or_path", str(other), "--model.reference", "separate"]
    code, err = run_main(args, capsys)
    assert code == 2
    assert err.strip() == (
        f"error: model.batching=padding_free: {hybrid_dir} cannot run packed rows: its config's layer_types "
        f"lists {LINEAR}, which carry state from one packed sequence into the next; use model.batching "
        "padded (auto picks it for this model)"
    )
    assert not (tmp_path / "runs").exists()  # refused before anything was written
