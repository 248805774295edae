"""Reference strategies: a separate frozen copy, the LoRA policy's own base, precomputed log-probs.

Numbers are checked against independent computations (a plain ``log_softmax`` over full logits and
the IPO formula written out); reference forwards are counted with a forward hook on the real models.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from ipo_lightning.callbacks import HFExport
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.errors import ConfigError
from ipo_lightning.lora import LoraOptions, merged_copy
from ipo_lightning.module import PreferenceModule
from ipo_lightning.precompute import longest_first
from ipo_lightning.tiny import save_tiny_model
from tests.conftest import CORPUS
from tests.helpers import polite_pairs, quiet_trainer, run_clis, write_config, write_jsonl
from tests.ranks import Torchrun

LORA = LoraOptions(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
BETA = 0.5


def _datamodule(tokenizer_dir: Path, train: Path, val: Path | None = None, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(
        train=DataSource(path=str(train)),
        val={"heldout": DataSource(path=str(val))} if val else None,
        tokenizer_name_or_path=str(tokenizer_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=4,
        **kwargs,
    )


def _naive_logps(model: torch.nn.Module, batch: dict, length_normalize: bool) -> torch.Tensor:
    """Per-row completion log-probs from full logits and a plain float32 log_softmax."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].float()
    sums = (token_logps * mask).sum(1)
    return sums / mask.sum(1) if length_normalize else sums


def _lora_module_with_random_adapters(model_dir: Path, **kwargs) -> PreferenceModule:
    """A LoRA module whose adapters are non-zero (peft starts B at 0, i.e. policy == reference)."""
    module = PreferenceModule(str(model_dir), lora=LORA, beta=BETA, **kwargs)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.policy.named_parameters():
            if "lora_" in name:  # A too: peft draws it from the global RNG
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


# ------------------------------------------------------------------ the three strategies agree


# Error analysis of the float32 comparisons below. The strategies compute the same quantities, in
# float32, in different orders:
# - per token, log p_t = z_label - logsumexp(z): another batch (other rows beside it, another padded
#   width or logits window), full logits instead of kept ones, or merged weights instead of base + LoRA
#   change the kernels' summation order, so log p_t moves by a few ulps of itself:
#   |d log p_t| <= c * eps * |log p_t|, c = PER_TOKEN_ULPS (measured: up to 1.35), eps = 2^-23;
# - per sequence, the float32 sum of its T token log-probs in another order moves by at most
#   (T - 1) * eps/2 * sum_t |log p_t| (the recursive-summation bound; typically sqrt(T) times less);
#   all log p_t < 0, so with s = sum_t log p_t: |d s| <= (c + T/2) * eps * |s| (measured: <= 1.6 eps
#   |s|, i.e. one or two ulps), and the same relative bound for the mean (s / T);
# - per pair, h = (s_c - ref_c) - (s_r - ref_r): |d h| <= the four sequences' |d s| summed;
# - the loss, mean_i (h_i - t)^2: |d loss| <= mean_i (2 |h_i - t| |d h_i| + |d h_i|^2).
# Where the precomputed values were scored in exactly the batch that training sees, the same function
# ran on the same tensors, so they are not merely close but equal, which is asserted bitwise.
EPS = torch.finfo(torch.float32).eps
PER_TOKEN_ULPS = 4.0


def _logp_error_bound(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[N] bound on |d logp| of each sequence's log-prob when it is computed in another order."""
    return (PER_TOKEN_ULPS + counts.double() / 2) * EPS * logps.double().abs()


def _ipo_loss_tolerance(
    h: torch.Tensor, target: float, policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor
) -> float:
    """Bound on |d loss| when both sides of a comparison compute every log-prob in their own order."""
    per_sequence = 2 * (_logp_error_bound(policy, counts) + _logp_error_bound(reference, counts))
    half = h.shape[0]
    delta_h = per_sequence[:half] + per_sequence[half:]
    return float((2 * (h.double() - target).abs() * delta_h + delta_h**2).mean())


@pytest.mark.parametrize("length_normalize", [True, False], ids=["mean", "sum"])
def test_separate_lora_and_precomputed_give_the_same_loss(
    tmp_path: Path, tiny_model_dir: Path, length_normalize: bool
) -> None:
    # Policy = base + low-rank update; reference = base. The LoRA module holds exactly that; the other
    # two hold the merged policy as plain weights and the base as their reference.
    # Padded rows throughout, as the precompute pass and the plain computation below run them: this
    # compares the strategies (the layouts are compared with each other in test_batching*.py).
    lora = _lora_module_with_random_adapters(
        tiny_model_dir, length_normalize=length_normalize, batching="padded"
    )
    policy_dir = tmp_path / "merged_policy"
    merged_copy(lora.policy).save_pretrained(policy_dir)
    common = {
        "reference_name_or_path": str(tiny_model_dir),
        "beta": BETA,
        "length_normalize": length_normalize,
        "batching": "padded",
    }
    separate = PreferenceModule(str(policy_dir), reference="separate", **common)
    separate.configure_model()
    precomputed = PreferenceModule(str(policy_dir), reference="precomputed", **common)

    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(8))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(6, offset=40))
    datamodule = _datamodule(tiny_model_dir, train, val, cache_dir=str(tmp_path / "cache"))
    quiet_trainer(tmp_path).validate(precomputed, datamodule=datamodule)  # runs the precompute pass
    batch = next(iter(datamodule.val_dataloader()[0]))
    assert "ref_chosen_logp_sum" in batch

    # The precompute pass's first batch (its 4 longest pairs), seen by training as it is: the
    # precomputed reference values and so the losses are bitwise those of the live reference.
    val_set = datamodule.val_datasets["heldout"]
    order = longest_first(val_set, range(len(val_set)))[: datamodule.val_batch_size]
    assert order != list(range(len(order)))  # another batch than `batch`: the general case differs
    same_batch = datamodule.collator([val_set[i] for i in order])
    rows = (same_batch["input_ids"], same_batch["attention_mask"], same_batch["completion_mask"])
    live_sums = separate.reference.sequence_logprobs(*rows, length_normalize=False, chunk_size=1024)
    stored_sums = torch.cat([same_batch["ref_chosen_logp_sum"], same_batch["ref_rejected_logp_sum"]])
    assert torch.equal(stored_sums, live_sums)
    with torch.no_grad():
        separate.eval(), precomputed.eval()
        assert torch.equal(precomputed.forward_pairs(same_batch)[0], separate.forward_pairs(same_batch)[0])

    # LoRA policy with a precomputed reference (the base): the same adapters, the cached values.
    lora_precomputed = PreferenceModule(
        str(tiny_model_dir),
        lora=LORA,
        reference="precomputed",
        beta=BETA,
        length_normalize=length_normalize,
        batching="padded",
    )
    lora_precomputed.configure_model()
    lora_precomputed.policy.load_state_dict(lora.policy.state_dict())

    # The general case: `batch` is batched otherwise than in the precompute pass.
    losses = {}
    strategies = [("separate", separate), ("lora", lora), ("precomputed", precomputed)]
    for name, module in [*strategies, ("lora+precomputed", lora_precomputed)]:
        module.eval()
        with torch.no_grad():
            loss, values = module.forward_pairs(batch)
        losses[name] = float(loss)
        if name == "separate":
            margin = values["logratio/margin"]

    # Independently: plain log_softmax log-probs of the merged policy and of the base, IPO by hand.
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pi, ref = _naive_logps(policy, batch, length_normalize), _naive_logps(reference, batch, length_normalize)
    half = pi.shape[0] // 2
    h = (pi[:half] - ref[:half]) - (pi[half:] - ref[half:])
    target = 1 / (2 * BETA)
    expected = float(((h - target) ** 2).mean())
    counts = batch["completion_mask"].sum(dim=1)
    tolerance = _ipo_loss_tolerance(h, target, pi, ref, counts)

    assert margin.abs().max() > 1e-2  # policy and reference really differ: the check has teeth
    # The bound (about 1e-3 of the loss in sum mode) is far below a real fault: one token more or less
    # moves a sum by about log(vocab) = 6 nats, bfloat16 log-probs by about 0.02 nats a token.
    assert tolerance < 1e-2 * expected
    for name, value in losses.items():
        assert abs(value - expected) <= tolerance, (name, value, expected, tolerance)


# ------------------------------------------------------------------ LoRA


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_lora_holds_one_copy_of_the_base_weights(tiny_model_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_bytes = _storage_bytes(base.parameters())

    module = PreferenceModule(str(tiny_model_dir), lora=LORA)
    assert module.hparams.reference == "lora"  # the default for a LoRA policy
    module.configure_model()
    reference_model = module.reference.model
    # The reference's parameters are the policy's own storage: not equal copies, the same memory.
    policy_ptrs = {p.untyped_storage().data_ptr() for p in module.policy.parameters()}
    reference_ptrs = {p.untyped_storage().data_ptr() for p in reference_model.parameters()}
    assert reference_ptrs == policy_ptrs
    everything = list(module.parameters()) + list(reference_model.parameters())
    lora_bytes = sum(
        p.numel() * p.element_size() for n, p in module.policy.named_parameters() if "lora_" in n
    )
    assert 0 < lora_bytes < 0.1 * base_bytes
    assert _storage_bytes(everything) == base_bytes + lora_bytes
    # Only the adapters train, and no "reference." keys reach checkpoints.
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(key.startswith("reference.") for key in module.state_dict())

    # Control: the separate strategy holds two copies (so the check above can fail).
    separate = PreferenceModule(str(tiny_model_dir), reference="separate")
    separate.configure_model()
    both = list(separate.policy.parameters()) + list(separate.reference.model.parameters())
    assert _storage_bytes(both) == 2 * base_bytes


def test_lora_reference_is_the_base_with_dropout_off(tmp_path: Path, tiny_model_dir: Path) -> None:
    # A base with attention dropout and LoRA dropout, in train mode: the reference must ignore both.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5)
    base.save_pretrained(tmp_path / "dropout_base")
    options = LoraOptions(rank=4, alpha=8.0, dropout=0.5, target_modules=["q_proj", "v_proj"])
    # Dropout kept on in the policy, so the reference has something to switch off.
    module = PreferenceModule(str(tmp_path / "dropout_base"), lora=options, disable_dropout=False)
    module.configure_model()
    module.train()
    datamodule = _datamodule(tiny_model_dir, write_jsonl(tmp_path / "t.jsonl", polite_pairs(4)))
    datamodule.setup("fit")
    batch = datamodule.collator([datamodule.train_dataset[i] for i in range(4)])
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])

    first = module.reference.sequence_logprobs(*rows, length_normalize=False, chunk_size=64)
    second = module.reference.sequence_logprobs(*rows, length_normalize=False, chunk_size=64)
    assert torch.equal(first, second)
    base.eval()
    torch.testing.assert_close(first, _naive_logps(base, batch, False), rtol=1e-5, atol=1e-5)
    # Every module is back in train mode, where dropout is really on (so the check above has teeth).
    assert all(m.training for m in module.policy.modules())
    assert not torch.equal(
        _naive_logps(module.policy, batch, False), _naive_logps(module.policy, batch, False)
    )


def test_lora_gradient_checkpointing_gives_the_same_adapter_gradients(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    datamodule = _datamodule(tiny_model_dir, write_jsonl(tmp_path / "t.jsonl", polite_pairs(4)))
    datamodule.setup("fit")
    batch = datamodule.collator([datamodule.train_dataset[i] for i in range(4)])
    gradients = []
    for checkpointing in (False, True):
        module = _lora_module_with_random_adapters(tiny_model_dir, gradient_checkpointing=checkpointing)
        module.train()
        loss, _ = module.forward_pairs(batch)
        loss.backward()
        grads = {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
        gradients.append(grads)
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-5, atol=1e-7)


def test_lora_fit_bf16_checkpoint_resume_and_merged_export(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(12))

    def module() -> PreferenceModule:
        return PreferenceModule(
            str(tiny_model_dir),
            lora=LORA,
            gradient_checkpointing=True,
            optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
            lr_schedule="constant",
        )

    first = module()
    export = HFExport(save_adapter=True)
    trainer = quiet_trainer(
        tmp_path / "a", max_steps=3, precision="bf16-mixed", enable_checkpointing=True, callbacks=[export]
    )
    trainer.fit(first, datamodule=_datamodule(tiny_model_dir, train))
    assert any(p.abs().sum() > 0 for n, p in first.policy.named_parameters() if "lora_B" in n)  # it trained

    # The checkpoint loads back strictly, adapters included.
    checkpoint = trainer.checkpoint_callback.best_model_path
    restored = PreferenceModule.load_from_checkpoint(checkpoint)
    for key, value in first.policy.state_dict().items():
        assert torch.equal(restored.policy.state_dict()[key], value), key

    # The export is a plain HF model (no peft) equal to the adapted policy; the adapter is saved too.
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    first.policy.eval()
    with torch.no_grad():
        expected = first.policy(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(export.export_dir)
        assert type(exported) is LlamaForCausalLM
        assert not any("lora" in key for key in exported.state_dict())
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        adapted = PeftModel.from_pretrained(base, export.export_dir / "adapter")
        torch.testing.assert_close(adapted(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)

    # Resume goes on from step 3.
    resumed = quiet_trainer(tmp_path / "b", max_steps=5, precision="bf16-mixed")
    resumed.fit(module(), datamodule=_datamodule(tiny_model_dir, train), ckpt_path=checkpoint)
    assert resumed.global_step == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lora": LORA, "reference": "separate"}, "model.reference=separate with model.lora"),
        ({"lora": LoraOptions(rank=0)}, "model.lora.rank"),
        ({"lora": LoraOptions(alpha=0)}, "model.lora.alpha"),
        ({"lora": LoraOptions(dropout=1.0)}, "model.lora.dropout"),
        ({"lora": LoraOptions(target_modules="attention")}, "model.lora.target_modules"),
        ({"reference": "lora", "reference_name_or_path": "/elsewhere"}, "model.reference_name_or_path"),
        ({"reference": "lora", "reference_dtype": "bfloat16"}, "model.reference_dtype"),
    ],
)
def test_bad_reference_options_name_the_option(tiny_model_dir: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        PreferenceModule(str(tiny_model_dir), **options)


def test_unknown_lora_target_module_names_the_option(tiny_model_dir: Path) -> None:
    module = PreferenceModule(str(tiny_model_dir), lora=LoraOptions(target_modules=["no_such_proj"]))
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules"):
        module.configure_model()


# ------------------------------------------------------------------ precomputed cache


class ReferenceForwards:
    """Counts forward calls of causal LMs in eval mode: the reference pass (the policy trains in train
    mode, and these fits run no validation and no divergence monitor)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> ReferenceForwards:
        def hook(module: torch.nn.Module, args, output) -> None:
            if isinstance(module, LlamaForCausalLM) and not module.training:
                self.count += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _fit_precomputed(tmp_path: Path, policy_dir: Path, reference_dir: Path, train: Path, val: Path):
    module = PreferenceModule(
        str(policy_dir), reference_name_or_path=str(reference_dir), reference="precomputed", beta=BETA
    )
    datamodule = _datamodule(policy_dir, train, val, cache_dir=str(tmp_path / "cache"))
    with ReferenceForwards() as forwards:
        quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=datamodule)
    return module.precompute_report, forwards.count, datamodule


def _expected_columns(reference_dir: Path, datamodule: PreferenceDataModule, dataset) -> torch.Tensor:
    """[N, 4] sums and counts scored independently with a plain log_softmax, one pair at a time."""
    model = AutoModelForCausalLM.from_pretrained(reference_dir)
    rows = []
    for index in range(len(dataset)):
        pair = {key: dataset[index][key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
        batch = datamodule.collator([pair])
        sums = _naive_logps(model, batch, length_normalize=False)
        rows.append([sums[0], len(pair["chosen_ids"]), sums[1], len(pair["rejected_ids"])])
    return torch.tensor(rows)


def _attached(dataset) -> torch.Tensor:
    names = [
        "ref_chosen_logp_sum",
        "ref_chosen_token_count",
        "ref_rejected_logp_sum",
        "ref_rejected_token_count",
    ]
    return torch.tensor([dataset[name] for name in names]).T


def test_precomputed_cache_is_reused_and_rebuilt_when_data_or_reference_change(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # The reference has attention dropout: the pass must run without it to match the eval-mode values.
    reference_dir = tmp_path / "reference"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5).save_pretrained(reference_dir)
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(10))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(6, offset=40))
    batches = {"train": math.ceil(10 / 4), "val/heldout": math.ceil(6 / 4)}

    # First run: both sets scored by the reference, values equal to an independent computation.
    report, forwards, datamodule = _fit_precomputed(tmp_path, tiny_model_dir, reference_dir, train, val)
    assert report.computed == ["train", "val/heldout"] and not report.hits
    assert forwards == batches["train"] + batches["val/heldout"]
    for dataset in (datamodule.train_dataset, datamodule.val_datasets["heldout"]):
        torch.testing.assert_close(
            _attached(dataset), _expected_columns(reference_dir, datamodule, dataset), rtol=1e-5, atol=1e-5
        )

    # Second run, fresh module and data module: all from the cache, no reference forward at all.
    report, forwards, _ = _fit_precomputed(tmp_path, tiny_model_dir, reference_dir, train, val)
    assert report.hits == ["train", "val/heldout"] and not report.computed
    assert forwards == 0

    # One training record changes: train is rebuilt, val still comes from the cache.
    changed = polite_pairs(10)
    changed[3]["chosen"] = " a different answer entirely."
    write_jsonl(train, changed)
    report, forwards, _ = _fit_precomputed(tmp_path, tiny_model_dir, reference_dir, train, val)
    assert report.computed == ["train"] and report.hits == ["val/heldout"]
    assert forwards == batches["train"]

    # The reference's weights change in place (same path): everything is rebuilt, with the new values.
    save_tiny_model(reference_dir, CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, seed=7)
    report, forwards, datamodule = _fit_precomputed(tmp_path, tiny_model_dir, reference_dir, train, val)
    assert report.computed == ["train", "val/heldout"]
    assert forwards == batches["train"] + batches["val/heldout"]
    dataset = datamodule.val_datasets["heldout"]
    torch.testing.assert_close(
        _attached(dataset), _expected_columns(reference_dir, datamodule, dataset), rtol=1e-5, atol=1e-5
    )

    # A damaged file under the right name is detected and rebuilt, never used.
    damaged = report.files["val/heldout"]
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.warns(UserWarning, match="recomputing"):
        report, forwards, _ = _fit_precomputed(tmp_path, tiny_model_dir, reference_dir, train, val)
    assert report.computed == ["val/heldout"] and forwards == batches["val/heldout"]
    with safe_open(str(damaged), framework="pt") as handle:
        assert handle.get_tensor("values").shape == (6, 4)
    # No temporary files left beside the cache.
    assert not [p for p in damaged.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_precomputed_under_ddp_writes_the_complete_cache(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two gloo processes through the CLI: each scores half, and the file holds every pair's values."""
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(9))  # odd: the shards differ in size
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(5, offset=40))
    cache = tmp_path / "cache"
    config = {
        "trainer": {
            "default_root_dir": str(tmp_path / "runs"),
            "accelerator": "cpu",
            "strategy": "ddp",
            "devices": 2,
            "max_steps": 1,  # the pass is what is tested: train and validate as little as possible
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": False,
        },
        "model": {"model_name_or_path": str(tiny_model_dir), "reference": "precomputed", "beta": BETA},
        "data": {
            "train": {"path": str(train)},
            "val": {"heldout": {"path": str(val)}},
            "max_length": 64,
            "max_prompt_length": 32,
            "batch_size": 2,
            "cache_dir": str(cache),
        },
        "wandb": {"enabled": False},
        "export": {"enabled": False},
    }
    config_path = write_config(tmp_path / "config.yaml", config)
    (result,) = run_clis(tmp_path, Torchrun(["fit", "--config", str(config_path)]), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pairs/s, 2 process(es)" in result.stderr + result.stdout
    assert "no reference model in memory" in result.stderr  # the divergence monitor says why it is off

    datamodule = _datamodule(tiny_model_dir, train, val, cache_dir=str(cache))
    datamodule.setup("fit")
    files = sorted((cache / "ipo_lightning_reference_logps").glob("*.safetensors"))
    assert len(files) == 2
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            label, values = handle.metadata()["set"], handle.get_tensor("values")
        dataset = datamodule.train_dataset if label == "train" else datamodule.val_datasets["heldout"]
        expected = _expected_columns(tiny_model_dir, datamodule, dataset)
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.lora.rank", "0"], "model.lora.rank must be at least 1"),
        (
            ["--model.reference", "separate", "--model.lora.rank", "4"],
            "model.reference=separate with model.lora",
        ),
        (["--model.lora.target_modules", "[no_such_proj]"], "model.lora.target_modules=['no_such_proj']"),
        (
            ["--model.reference", "precomputed", "--kl_budget.max_kl", "0.1"],
            "kl_budget.max_kl needs a reference",
        ),
    ],
    ids=["rank", "separate-with-lora", "target-modules", "precomputed-kl-budget"],
)
def test_bad_reference_settings_fail_on_the_command_line_with_one_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    from ipo_lightning.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    base = ["fit", "--model.model_name_or_path", str(tiny_model_dir), "--data.train.path", str(train)]
    base += ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_steps", "1"]
    base += ["--wandb.enabled", "false", "--data.cache_dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and expected in message[0], err[-2000:]
    assert "Traceback" not in err
