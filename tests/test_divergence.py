"""Exact token-level divergence and the DivergenceMonitor callback, against naive computations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from ipo_lightning.callbacks.divergence_monitor import DivergenceMonitor
from ipo_lightning.callbacks.kl_budget import KLBudget
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.divergence.token_kl import TokenDivergence, chunked_token_divergence
from ipo_lightning.errors import ConfigError
from ipo_lightning.module import PreferenceModule
from tests.helpers import polite_pairs, write_jsonl


def _naive_sums(policy_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor):
    """Per-position double loops over the vocabulary, in float64."""
    kl = reverse = entropy = 0.0
    for row, position in mask.nonzero().tolist():
        p = torch.softmax(policy_logits[row, position].double(), -1)
        q = torch.softmax(reference_logits[row, position].double(), -1)
        kl += float((p * (p.log() - q.log())).sum())
        reverse += float((q * (q.log() - p.log())).sum())
        entropy += float(-(p * p.log()).sum())
    return kl, reverse, entropy


def _chunked(
    policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, chunk_size: int
) -> TokenDivergence:
    """The masked positions in chunks, as KeptLogits.scored_chunks feeds them."""
    flat_policy = policy.reshape(-1, policy.shape[-1])[mask.reshape(-1)]
    flat_reference = reference.reshape(-1, reference.shape[-1])[mask.reshape(-1)]
    starts = range(0, flat_policy.shape[0], chunk_size)
    return chunked_token_divergence(
        (flat_policy[start : start + chunk_size], flat_reference[start : start + chunk_size])
        for start in starts
    )


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_token_divergence_matches_naive_sums(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    policy = torch.randn(3, 7, 13, generator=generator)
    reference = torch.randn(3, 7, 13, generator=generator)
    mask = torch.rand(3, 7, generator=generator) > 0.4
    got = _chunked(policy, reference, mask, chunk_size)
    kl, reverse, entropy = _naive_sums(policy, reference, mask)
    assert got.tokens == int(mask.sum())
    assert got.kl == pytest.approx(kl, rel=1e-5)
    assert got.kl_reverse == pytest.approx(reverse, rel=1e-5)
    assert got.entropy == pytest.approx(entropy, rel=1e-5)
    same = _chunked(policy, policy.clone(), mask, chunk_size)
    assert same.kl == 0.0 and same.kl_reverse == 0.0


def _setup(tmp_path: Path, tiny_model_dir: Path) -> tuple[PreferenceModule, PreferenceDataModule]:
    train_file = write_jsonl(tmp_path / "train.jsonl", polite_pairs(12))
    datamodule = PreferenceDataModule(
        train=DataSource(path=str(train_file)),
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=2,
    )
    module = PreferenceModule(
        str(tiny_model_dir),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        lr_schedule="constant",
    )
    return module, datamodule


def test_monitor_fires_at_optimizer_steps_and_measures_exactly(tmp_path: Path, tiny_model_dir: Path) -> None:
    module, datamodule = _setup(tmp_path, tiny_model_dir)
    texts = ["The quick brown fox jumps over the lazy dog.", "Write a short poem about the sea.", "Paris"]
    retention_file = tmp_path / "retention.txt"
    retention_file.write_text("\n".join(texts) + "\n\n")
    monitor = DivergenceMonitor(
        every_n_steps=2,
        num_pairs=5,
        batch_size=2,
        sample_prompts=2,
        max_new_tokens=8,
        retention_file=str(retention_file),
    )
    logger = CSVLogger(tmp_path / "logs", name="")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        accumulate_grad_batches=2,
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)

    rows = [
        r for r in csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()) if r.get("divergence/kl")
    ]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6]
    # Step 0: the policy is the reference, so every divergence is exactly zero.
    assert float(rows[0]["divergence/kl"]) == 0.0 and float(rows[0]["divergence/kl_reverse"]) == 0.0
    assert float(rows[0]["divergence/logratio/margin_mean"]) == 0.0
    assert float(rows[0]["divergence/entropy"]) > 0.0
    assert float(rows[0]["divergence/seq_kl"]) == 0.0 and float(rows[0]["divergence/gen_length"]) >= 1
    assert float(rows[0]["divergence/retention/chosen"]) == 0.0
    assert float(rows[0]["divergence/retention/text"]) == 0.0
    assert float(rows[-1]["divergence/kl"]) > 0.0  # training moved the policy

    # The samples table: two prompts per measurement, readable text, and log-ratios whose mean is the
    # logged sequence KL of that step.
    samples = [json.loads(line) for line in (Path(logger.log_dir) / "divergence_samples.jsonl").open()]
    assert [row["step"] for row in samples] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert set(samples[0]) == {"step", "prompt", "policy_completion", "reference_completion", "log_ratio"}
    assert samples[0]["prompt"].startswith("Human:") and samples[0]["log_ratio"] == 0.0
    for row in rows:
        ratios = [sample["log_ratio"] for sample in samples if sample["step"] == int(row["step"])]
        assert float(row["divergence/seq_kl"]) == pytest.approx(sum(ratios) / len(ratios), rel=1e-6, abs=1e-9)

    # The last measurement equals a naive full-softmax computation on the same held-out pairs.
    module.eval()
    pairs = [datamodule.train_dataset[i] for i in range(5)]
    batch = datamodule.collator(pairs)
    with torch.no_grad():
        ids, attention = batch["input_ids"], batch["attention_mask"]
        policy_logits = module.policy(input_ids=ids, attention_mask=attention).logits
        reference_logits = module.reference.model(input_ids=ids, attention_mask=attention).logits
    mask = batch["completion_mask"][:, 1:]
    kl, reverse, entropy = _naive_sums(policy_logits[:, :-1], reference_logits[:, :-1], mask)
    tokens = int(mask.sum())
    assert float(rows[-1]["divergence/kl"]) == pytest.approx(kl / tokens, rel=1e-4)
    assert float(rows[-1]["divergence/kl_reverse"]) == pytest.approx(reverse / tokens, rel=1e-4)
    assert float(rows[-1]["divergence/entropy"]) == pytest.approx(entropy / tokens, rel=1e-4)

    # Retention: log pi - log ref pooled over every chosen token, and over every text token after the first.
    def delta_per_token(ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> float:
        with torch.no_grad():
            logits = [m(input_ids=ids, attention_mask=attention).logits for m in (module.policy, ref)]
        labels = ids[:, 1:, None]
        pi, rf = (torch.log_softmax(x[:, :-1].double(), -1).gather(-1, labels)[..., 0] for x in logits)
        return float((pi - rf)[mask].sum() / mask.sum())

    ref = module.reference.model
    half = len(pairs)
    chosen_expected = delta_per_token(ids[:half], attention[:half], mask[:half])
    assert float(rows[-1]["divergence/retention/chosen"]) == pytest.approx(chosen_expected, rel=1e-4)
    encoded = datamodule.tokenizer(texts, padding=True, return_tensors="pt")
    text_mask = encoded["attention_mask"][:, 1:].bool()
    text_expected = delta_per_token(encoded["input_ids"], encoded["attention_mask"], text_mask)
    assert float(rows[-1]["divergence/retention/text"]) == pytest.approx(text_expected, rel=1e-4)
    # ...and its margin statistics equal the loss path's own log-ratios.
    module.uses_soft_labels = False
    with torch.no_grad():
        _, values = module.forward_pairs(batch)
    assert float(rows[-1]["divergence/logratio/margin_mean"]) == pytest.approx(
        float(values["logratio/margin"].mean()), rel=1e-4, abs=1e-6
    )


def _fit_with_budget(tmp_path: Path, tiny_model_dir: Path, on_exceed: str) -> tuple[L.Trainer, KLBudget]:
    module, datamodule = _setup(tmp_path, tiny_model_dir)
    monitor = DivergenceMonitor(every_n_steps=2, num_pairs=4, sample_prompts=0)
    budget = KLBudget(max_kl=1e-6, on_exceed=on_exceed)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        callbacks=[monitor, budget],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, budget


def test_kl_budget_stops_the_run_and_leaves_a_loadable_checkpoint(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with pytest.warns(UserWarning, match=r"divergence/kl = .* exceeds the KL budget .* at optimizer step 2"):
        trainer, budget = _fit_with_budget(tmp_path, tiny_model_dir, "stop")
    assert trainer.global_step == 2  # stopped at the first measurement over budget, not at max_steps
    assert budget.checkpoint is not None and budget.checkpoint.name == "kl_budget_step2.ckpt"
    restored = PreferenceModule.load_from_checkpoint(budget.checkpoint)
    for key, value in trainer.lightning_module.policy.state_dict().items():
        assert torch.equal(restored.policy.state_dict()[key], value)


def test_kl_budget_warn_keeps_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.warns(UserWarning, match="exceeds the KL budget") as caught:
        trainer, budget = _fit_with_budget(tmp_path, tiny_model_dir, "warn")
    assert trainer.global_step == 8 and budget.checkpoint is None
    # One warning per measurement over budget (steps 2, 4, 6, 8; step 0 has KL 0), none in between.
    steps = [str(w.message).rsplit(" ", 1)[-1] for w in caught if "exceeds the KL budget" in str(w.message)]
    assert steps == ["2", "4", "6", "8"]


@pytest.mark.parametrize("monitor_first", [None, False], ids=["no-monitor", "budget-before-monitor"])
def test_kl_budget_without_a_monitor_before_it_is_refused(
    tmp_path: Path, tiny_model_dir: Path, monitor_first: bool | None
) -> None:
    module, datamodule = _setup(tmp_path, tiny_model_dir)
    budget = KLBudget(max_kl=0.1)
    callbacks = [budget] if monitor_first is None else [budget, DivergenceMonitor(sample_prompts=0)]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=callbacks)
    message = "only the divergence monitor logs" if monitor_first is None else "must come after"
    with pytest.raises(ConfigError, match=message):
        trainer.fit(module, datamodule=datamodule)


def _tiny_lm(seed: int, scale: float):
    from ipo_lightning.tiny import build_tiny_llama

    model = build_tiny_llama(5, hidden_size=16, num_layers=1, num_heads=2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # peaky next-token distributions: a KL well above noise
    return model


def _exact_sequence_kl(policy, reference, prompt: torch.Tensor, max_new_tokens: int, eos: int) -> float:
    """Enumerate every completion (ended by EOS or by the length cap) with its probability."""
    total = 0.0
    stack = [(prompt, 0.0, 0.0)]  # (ids, log pi, log ref) of the prefix
    while stack:
        ids, log_pi, log_ref = stack.pop()
        with torch.no_grad():
            log_p = torch.log_softmax(policy(input_ids=ids[None]).logits[0, -1].double(), -1)
            log_q = torch.log_softmax(reference(input_ids=ids[None]).logits[0, -1].double(), -1)
        for token in range(log_p.numel()):
            lp, lq = log_pi + float(log_p[token]), log_ref + float(log_q[token])
            longer = torch.cat([ids, torch.tensor([token])])
            if token == eos or longer.numel() - prompt.numel() == max_new_tokens:
                total += float(torch.tensor(lp).exp()) * (lp - lq)
            else:
                stack.append((longer, lp, lq))
    return total


def test_sampled_sequence_kl_is_honest_against_enumeration(tiny_tokenizer) -> None:
    from ipo_lightning.divergence.sampling import sampled_sequence_kl

    policy, reference = _tiny_lm(seed=0, scale=30.0), _tiny_lm(seed=1, scale=30.0)
    policy.generation_config.eos_token_id = 4  # the sampler stops at the model's own EOS
    prompt = torch.tensor([1, 2])
    exact = _exact_sequence_kl(policy, reference, prompt, max_new_tokens=3, eos=4)
    estimate, samples = sampled_sequence_kl(
        policy, reference, tiny_tokenizer, [prompt], samples_per_prompt=400, max_new_tokens=3, seed=0
    )
    assert exact > 0.05  # the two models really differ, so the check has teeth
    assert abs(estimate.mean - exact) < 4 * estimate.stderr
    assert estimate.samples == len(samples) == 400 and 1 <= estimate.mean_length <= 3
    assert all(s.completion.numel() == 3 or int(s.completion[-1]) == 4 for s in samples)

    same, _ = sampled_sequence_kl(
        policy, policy, tiny_tokenizer, [prompt], samples_per_prompt=20, max_new_tokens=3
    )
    assert same.mean == 0.0 and same.stderr == 0.0


def test_retention_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    from ipo_lightning.data.retention import read_texts
    from ipo_lightning.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="divergence.retention_file .*missing.txt.*: no such file"):
        read_texts(tmp_path / "missing.txt", limit=4)
    bad = tmp_path / "texts.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"texts.jsonl:3: needs a non-empty string field 'text'"):
        read_texts(bad, limit=4)
    assert read_texts(bad, limit=1) == ["fine"]  # reading stops at the limit
