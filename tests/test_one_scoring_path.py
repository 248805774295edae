"""Training, the precompute pass and the divergence measurement score through one function.

``ipo_lightning.batching.layout_logits`` is wrapped by a recorder that delegates to the real
function; a forward hook counts every causal-LM forward. Each of the three must run every one of its
forwards through the wrapper (a path of its own would show as a forward the recorder did not see),
and they must agree: the precomputed sums are the live reference's on the same batches, and the
divergence log-ratios are the training step's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from ipo_lightning import batching
from ipo_lightning.batching import KeptLogits, RowLayout
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.divergence.measure import HeldOut, MeasureOptions, measure_share
from ipo_lightning.module import PreferenceModule
from ipo_lightning.precompute import longest_first
from tests.helpers import polite_pairs, quiet_trainer, write_jsonl


@dataclass
class Calls:
    """What went through ``layout_logits``, and how many causal-LM forwards ran meanwhile."""

    scored: list[tuple[torch.nn.Module, RowLayout, KeptLogits]] = field(default_factory=list)
    forwards: int = 0

    def by(self, model: torch.nn.Module) -> list[tuple[RowLayout, KeptLogits]]:
        return [(layout, kept) for caller, layout, kept in self.scored if caller is model]


@contextmanager
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    calls = Calls()
    real = batching.layout_logits

    def recording(model: torch.nn.Module, layout: RowLayout) -> KeptLogits:
        kept = real(model, layout)
        calls.scored.append((model, layout, kept))
        return kept

    def count(module: torch.nn.Module, args, output) -> None:
        if isinstance(module, LlamaForCausalLM):
            calls.forwards += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(batching, "layout_logits", recording)
            yield calls
    finally:
        handle.remove()


def _datamodule(tiny_model_dir: Path, tmp_path: Path) -> PreferenceDataModule:
    return PreferenceDataModule(
        train=DataSource(path=str(write_jsonl(tmp_path / "train.jsonl", polite_pairs(4)))),
        val={
            "heldout": DataSource(path=str(write_jsonl(tmp_path / "val.jsonl", polite_pairs(6, offset=40))))
        },
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )


@pytest.mark.parametrize("mode", ["padded", "padding_free"])
def test_training_precompute_and_divergence_share_one_scoring_function(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # A reference other than the policy (a trained-looking policy: its lm_head scaled), so the
    # log-ratios are not all zero.
    live = PreferenceModule(str(tiny_model_dir), batching=mode, length_normalize=True)
    live.configure_model()
    with torch.no_grad():
        live.policy.lm_head.weight.mul_(1.5)
    datamodule = _datamodule(tiny_model_dir, tmp_path)

    # The precompute pass, in the run's batching mode: every reference forward goes through the wrapper.
    precomputed = PreferenceModule(str(tiny_model_dir), reference="precomputed", batching=mode)
    with recorded(monkeypatch) as calls:
        quiet_trainer(tmp_path, limit_val_batches=0).validate(precomputed, datamodule=datamodule)
    pass_calls = [(layout, kept) for model, layout, kept in calls.scored if model is not precomputed.policy]
    assert len(pass_calls) == 2 == calls.forwards  # 6 val pairs in batches of 4 (train is not scored)
    # ...and stored exactly what it scored, which the live reference reproduces on the same layouts.
    val_set = datamodule.val_datasets["heldout"]
    order = longest_first(val_set, range(len(val_set)))
    for number, (layout, kept) in enumerate(pass_calls):
        positions = order[number * 4 : (number + 1) * 4]
        sums = kept.scores().sums
        half = len(positions)
        stored = torch.tensor([val_set[i]["ref_chosen_logp_sum"] for i in positions])
        stored_rejected = torch.tensor([val_set[i]["ref_rejected_logp_sum"] for i in positions])
        assert torch.equal(stored, sums[:half]) and torch.equal(stored_rejected, sums[half:])
        assert torch.equal(batching.layout_logits(live.reference.model, layout).scores().sums, sums)

    # A training step: policy and reference, both through the wrapper.
    batch = datamodule.collator([val_set[i] for i in range(4)])
    live.train()
    with recorded(monkeypatch) as calls:
        live.training_step(batch, 0)
    assert len(calls.by(live.policy)) == 1 and len(calls.by(live.reference.model)) == 1
    assert calls.forwards == 2

    # A divergence measurement on the same pairs: one forward per model, through the wrapper, and the
    # training path's log-ratio margins, bitwise.
    live.eval()
    with torch.no_grad():
        _, values = live.forward_pairs(batch)
    options = MeasureOptions(batching=mode, length_normalize=True)
    with recorded(monkeypatch) as calls:
        share = measure_share(live.policy, live.reference.model, HeldOut(batches=[batch]), options)
    assert len(calls.by(live.policy)) == 1 and len(calls.by(live.reference.model)) == 1
    assert calls.forwards == 2
    result = share.batches[0]
    margins = torch.tensor(result.chosen) - torch.tensor(result.rejected)
    assert values["logratio/margin"].abs().min() > 1e-4  # the models differ: the check has teeth
    assert torch.equal(margins, values["logratio/margin"])


@pytest.mark.parametrize("mode", ["padded", "padding_free", "prefix_shared"])
def test_kept_logits_in_canonical_order_give_the_scores(
    tiny_model_dir: Path, tmp_path: Path, mode: str
) -> None:
    module = PreferenceModule(str(tiny_model_dir))
    module.configure_model()
    datamodule = _datamodule(tiny_model_dir, tmp_path)
    datamodule.setup("fit")
    batch = datamodule.collator([datamodule.train_dataset[i] for i in range(4)])
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        kept = batching.batch_logits(module.policy, *rows, batching=mode)
    scored = kept.scored()
    assert scored.shape == (int(batch["completion_mask"].sum()), module.policy.config.vocab_size)
    assert torch.equal(torch.cat(list(kept.scored_chunks(5))), scored)
    # Canonical order: sequence by sequence, each completion's tokens in order (the labels say so).
    completion_tokens = batch["input_ids"][batch["completion_mask"]]
    assert torch.equal(kept.labels(), completion_tokens)
    picked = torch.log_softmax(scored.float(), -1).gather(-1, kept.labels()[:, None])[:, 0]
    torch.testing.assert_close(kept.scores(chunk_size=3).token_logps, picked, rtol=0, atol=1e-6)
