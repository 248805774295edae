"""The divergence measurement as a pure function (no Trainer), against a one-sequence-at-a-time oracle."""

from __future__ import annotations

import pytest
import torch

from ipo_lightning.batching import BATCHING_CHOICES
from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.divergence.measure import HeldOut, MeasureOptions, measure, measure_share, merge_shares
from ipo_lightning.tiny import build_tiny_llama

VOCAB = 50
# (prompt, chosen, rejected) lengths: uneven, so rows pad and pack differently per batching mode.
SPANS = [(3, 5, 2), (1, 4, 6), (6, 2, 3), (2, 7, 1), (4, 3, 3)]


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    models = [build_tiny_llama(VOCAB, hidden_size=16, num_layers=1, num_heads=2, seed=s) for s in (0, 1)]
    with torch.no_grad():
        for model in models:
            model.lm_head.weight.mul_(10.0)  # peaky next-token distributions: a KL well above noise
    return models[0], models[1]


def _pairs() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)

    def ids(count: int) -> list[int]:
        return torch.randint(1, VOCAB, (count,), generator=generator).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in SPANS]


def _log_softmax(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64 next-token log-probs of one unpadded row."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def _oracle(policy, reference, pairs, texts, length_normalize: bool) -> dict[str, float]:
    """Every metric from one sequence at a time, float64 full softmaxes, written out by hand."""
    kl = reverse = entropy = 0.0
    tokens = 0
    ratios: dict[str, list[float]] = {"chosen": [], "rejected": []}
    chosen_delta: list[float] = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            prompt, completion = pair["prompt_ids"], pair[f"{side}_ids"]
            ids = prompt + completion
            log_p, log_q = _log_softmax(policy, ids), _log_softmax(reference, ids)
            deltas = []
            for target in range(max(len(prompt), 1), len(ids)):
                lp, lq = log_p[target - 1], log_q[target - 1]
                p, q = lp.exp(), lq.exp()
                kl += float((p * (lp - lq)).sum())
                reverse += float((q * (lq - lp)).sum())
                entropy += float(-(p * lp).sum())
                tokens += 1
                deltas.append(float(lp[ids[target]] - lq[ids[target]]))
            ratios[side].append(sum(deltas) / (len(deltas) if length_normalize else 1))
            if side == "chosen":
                chosen_delta += deltas
    text_delta = []
    for text in texts:
        log_p, log_q = _log_softmax(policy, text), _log_softmax(reference, text)
        text_delta += [float(log_p[t - 1, text[t]] - log_q[t - 1, text[t]]) for t in range(1, len(text))]
    chosen, rejected = torch.tensor(ratios["chosen"]), torch.tensor(ratios["rejected"])
    metrics = {
        "kl": kl / tokens,
        "kl_reverse": reverse / tokens,
        "entropy": entropy / tokens,
        "retention/chosen": sum(chosen_delta) / len(chosen_delta),
        "retention/text": sum(text_delta) / len(text_delta),
    }
    for name, values in (("chosen", chosen), ("rejected", rejected), ("margin", chosen - rejected)):
        metrics[f"logratio/{name}_mean"] = float(values.mean())
        metrics[f"logratio/{name}_std"] = float(values.std(unbiased=False))
    return metrics


def _text_batch(texts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(text) for text in texts)
    input_ids = torch.zeros((len(texts), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, text in enumerate(texts):
        input_ids[row, : len(text)] = torch.tensor(text)
        attention_mask[row, : len(text)] = 1
    completion_mask = attention_mask.bool()
    completion_mask[:, 0] = False
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


@pytest.mark.parametrize("batching", BATCHING_CHOICES)
@pytest.mark.parametrize("length_normalize", [False, True], ids=["sum", "mean"])
def test_measure_matches_a_one_sequence_at_a_time_oracle(batching: str, length_normalize: bool) -> None:
    policy, reference = _models()
    pairs = _pairs()
    collate = PairwiseCollator(pad_token_id=0)
    texts = [[5, 9, 11, 3, 8, 2], [7, 1], [4, 4, 12, 30]]
    held_out = HeldOut(
        batches=[collate(pairs[:2]), collate(pairs[2:])],  # two batches: the pooling across them counts
        texts=[_text_batch(texts[:2]), _text_batch(texts[2:])],
    )
    options = MeasureOptions(batching=batching, length_normalize=length_normalize, chunk_size=3)
    got = measure(policy, reference, held_out, options)
    expected = _oracle(policy, reference, pairs, texts, length_normalize)
    assert expected["kl"] > 0.01 and abs(expected["logratio/margin_mean"]) > 1e-3  # the models differ
    assert set(got) == set(expected)  # no prompts, so no sampled metrics
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # The same model on both sides: every divergence is exactly zero, the entropy is not.
    same = measure(policy, policy, held_out, options)
    assert same["kl"] == same["kl_reverse"] == same["logratio/margin_mean"] == same["retention/text"] == 0.0
    assert same["entropy"] == pytest.approx(expected["entropy"], rel=1e-4)


def test_shares_of_two_processes_merge_to_the_single_process_measurement(tiny_tokenizer) -> None:
    policy, reference = _models()
    pairs = _pairs()
    collate = PairwiseCollator(pad_token_id=0)
    prompts = [torch.tensor(pair["prompt_ids"]) for pair in pairs[:3]]
    held_out = HeldOut(batches=[collate(pairs[i : i + 2]) for i in range(0, 5, 2)], prompts=prompts)
    options = MeasureOptions(max_new_tokens=4)
    single = merge_shares([measure_share(policy, reference, held_out, options, tokenizer=tiny_tokenizer)])
    shares = [
        measure_share(policy, reference, held_out, options, tokenizer=tiny_tokenizer, rank=r, world=2)
        for r in (0, 1)
    ]
    assert sorted(shares[0].batches) == [0, 2] and sorted(shares[1].batches) == [1]
    merged = merge_shares(shares[::-1])  # gathered in any order
    assert merged.metrics == single.metrics
    assert [s.prompt_index for s in merged.policy_samples] == [0, 1, 2]
    for got, expected in zip(merged.policy_samples, single.policy_samples, strict=True):
        assert torch.equal(got.completion, expected.completion)
    for got, expected in zip(merged.reference_completions, single.reference_completions, strict=True):
        assert torch.equal(got, expected)

    # The sampled sequence KL is the mean log-ratio of the samples, each re-scored here independently.
    ratios = []
    for sample in single.policy_samples:
        ids = sample.prompt.tolist() + sample.completion.tolist()
        log_p, log_q = _log_softmax(policy, ids), _log_softmax(reference, ids)
        start = sample.prompt.numel()
        ratios.append(sum(float(log_p[t - 1, ids[t]] - log_q[t - 1, ids[t]]) for t in range(start, len(ids))))
    assert single.metrics["seq_kl"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4, abs=1e-6)
    lengths = [sample.completion.numel() for sample in single.policy_samples]
    assert single.metrics["gen_length"] == sum(lengths) / len(lengths)


@pytest.mark.parametrize("batching", ["padded", "padding_free"])
def test_sampled_log_ratios_are_the_teacher_forced_log_ratios_of_the_drawn_tokens(
    tiny_tokenizer, batching: str
) -> None:
    from ipo_lightning.divergence.sampling import sample_completions
    from ipo_lightning.generation import generate_completions

    policy, reference = _models()
    policy.generation_config.eos_token_id = 7  # a token the peaky models draw now and then
    prompts = [torch.tensor(pair["prompt_ids"]) for pair in _pairs()]
    options = {"samples_per_prompt": 3, "max_new_tokens": 6, "seed": 11}
    samples = sample_completions(
        policy, reference, tiny_tokenizer, prompts, batch_size=4, batching=batching, **options
    )
    # Drawn by the project's one sampler, with its per-(seed, prompt, sample) generators...
    drawn = generate_completions(
        policy,
        tiny_tokenizer,
        [p.tolist() for p in prompts],
        k=3,
        seed=11,
        max_new_tokens=6,
        batch_size=64,
    )
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(3)]
    assert [s.completion.tolist() for s in samples] == [c.token_ids for row in drawn for c in row]
    assert any(int(s.completion[-1]) == 7 for s in samples) and any(
        s.completion.numel() == 6 for s in samples
    )
    # ...and each log-ratio is log pi - log ref of exactly those tokens, one unpadded row at a time.
    for sample in samples:
        ids = sample.prompt.tolist() + sample.completion.tolist()
        log_p, log_q = _log_softmax(policy, ids), _log_softmax(reference, ids)
        start = sample.prompt.numel()
        expected = sum(float(log_p[t - 1, ids[t]] - log_q[t - 1, ids[t]]) for t in range(start, len(ids)))
        assert sample.log_ratio == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert max(abs(s.log_ratio) for s in samples) > 0.1  # the models differ: the check has teeth
    # A prompt's samples do not depend on the other prompts drawn with it (a process's share).
    alone = sample_completions(policy, reference, tiny_tokenizer, prompts[3:4], prompt_indices=[3], **options)
    assert [s.completion.tolist() for s in alone] == [s.completion.tolist() for s in samples[9:12]]
    assert [s.log_ratio for s in alone] == pytest.approx([s.log_ratio for s in samples[9:12]], abs=1e-5)


def test_lora_reference_samples_are_the_base_models_and_the_policy_keeps_its_adapters(
    tiny_model_dir, tiny_tokenizer
) -> None:
    from transformers import AutoModelForCausalLM

    from ipo_lightning.generation import generate_completions
    from ipo_lightning.lora import LoraOptions
    from ipo_lightning.module import PreferenceModule

    module = PreferenceModule(
        str(tiny_model_dir),
        lora=LoraOptions(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.policy.named_parameters():
            if "lora_" in name:  # non-zero adapters: the policy differs from its base
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    prompts = [
        torch.tensor(tiny_tokenizer(text)["input_ids"]) for text in ("Human: the sea?", "Write a poem")
    ]
    held_out = HeldOut(batches=[], prompts=prompts)
    options = MeasureOptions(max_new_tokens=8)
    module.policy.train()
    share = measure_share(module.policy, module.reference.model, held_out, options, tokenizer=tiny_tokenizer)
    assert module.policy.training  # its mode is put back

    def draws(model: torch.nn.Module) -> list[list[int]]:
        rows = generate_completions(model, tiny_tokenizer, [p.tolist() for p in prompts], max_new_tokens=8)
        return [row[0].token_ids for row in rows]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert [completion.tolist() for _, completion in share.reference_completions] == draws(base)
    module.policy.eval()
    assert [sample.completion.tolist() for sample in share.policy_samples] == draws(module.policy)
    assert draws(module.policy) != draws(base)  # the adapters change what is drawn: the check has teeth
    assert all(sample.log_ratio != 0.0 for sample in share.policy_samples)
