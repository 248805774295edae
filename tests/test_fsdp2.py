"""FSDP2 (ipo_lightning.fsdp2) in one process: what gets sharded, local forwards, and checkpoints in
the layout one process writes. Two processes against one: tests/test_distributed.py and the divergence
and generation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed.fsdp import is_fsdp_managed_module

from ipo_lightning.batching import batch_scores
from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.errors import ConfigError
from ipo_lightning.fsdp2 import (
    PreferenceFSDP2Strategy,
    _resharding,
    local_forwards,
    resolve_gather_dtype,
    shard_models,
)
from ipo_lightning.lora import LoraOptions, merged_copy, merged_from_state_dict
from ipo_lightning.module import PreferenceModule

FEATURES = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]},
    {"prompt_ids": [13, 14], "chosen_ids": [15, 16, 17], "rejected_ids": [18]},
]


def _module(model_dir: Path, *, sharded: bool, shard_reference: bool = True) -> PreferenceModule:
    module = PreferenceModule(str(model_dir), beta=0.5)
    module.configure_model()
    if sharded:
        shard_models(module, init_device_mesh("cpu", (1,)), shard_reference)
    return module


def _batch() -> dict[str, torch.Tensor]:
    return PairwiseCollator(pad_token_id=0)(FEATURES)


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def test_shard_models_makes_every_decoder_layer_and_model_a_unit(
    tiny_model_dir: Path, single_process_group: None
) -> None:
    module = _module(tiny_model_dir, sharded=True)
    for model in (module.policy, module.reference.model):
        assert isinstance(model, FSDPModule)
        assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)
        assert all(isinstance(param, DTensor) for param in model.parameters())
    shard_models(module, init_device_mesh("cpu", (1,)))  # a later validate/test: left as it is
    module.train()  # what Lightning does at fit start: the reference stays frozen
    assert not any(sub.training for sub in module.reference.modules())
    assert not any(param.requires_grad for param in module.reference.parameters())
    assert not any(key.startswith("reference.") for key in module.state_dict())

    kept = _module(tiny_model_dir, sharded=True, shard_reference=False)
    assert isinstance(kept.policy, FSDPModule)
    assert not any(isinstance(sub, FSDPModule) for sub in kept.reference.modules())


def test_local_forwards_run_the_full_weights_and_restore_every_unit(
    tiny_model_dir: Path, single_process_group: None
) -> None:
    """Inside, the sharded policy scores and samples as the plain model does with no FSDP mark for
    ``generate()`` to sync on; on exit the marks, the resharding settings and the shards are as on
    entry."""
    module = _module(tiny_model_dir, sharded=True)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    batch = _batch()
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        module.forward_pairs(batch)  # a sharded forward first, as training runs before a measurement
    units = [sub for sub in module.modules() if isinstance(sub, FSDPModule)]
    settings = [_resharding(unit) for unit in units]
    marked = [sub for sub in module.modules() if is_fsdp_managed_module(sub)]
    assert module.policy.model.embed_tokens in marked
    module.policy.eval()
    with torch.no_grad():
        expected = batch_scores(plain, *rows, batching="prefix_shared").token_logps
        expected_tokens = plain.generate(prompt, max_new_tokens=4, do_sample=False)
        with local_forwards(module) as gathered:
            assert gathered
            assert not any(is_fsdp_managed_module(sub) for sub in module.modules())
            assert not any(isinstance(param, DTensor) for param in module.policy.parameters())
            for _ in range(2):  # forwards after the first find the weights in place
                scores = batch_scores(module.policy, *rows, batching="prefix_shared").token_logps
                torch.testing.assert_close(scores, expected)
            assert torch.equal(
                module.policy.generate(prompt, max_new_tokens=4, do_sample=False), expected_tokens
            )
    assert [sub for sub in module.modules() if is_fsdp_managed_module(sub)] == marked
    assert [_resharding(unit) for unit in units] == settings
    assert all(isinstance(param, DTensor) for param in module.policy.parameters())
    with local_forwards(torch.nn.Linear(2, 2)) as gathered:  # nothing sharded: nothing to do
        assert not gathered


def _strategy(module: PreferenceModule, optimizer: torch.optim.Optimizer) -> PreferenceFSDP2Strategy:
    strategy = PreferenceFSDP2Strategy()
    strategy.connect(module)
    strategy.optimizers = [optimizer]
    return strategy


def _trained(module: PreferenceModule) -> torch.optim.Optimizer:
    """One AdamW step on the policy (state for every parameter)."""
    optimizer = torch.optim.AdamW(list(module.policy.parameters()), lr=1e-2)
    loss, _ = module.forward_pairs(_batch())
    loss.backward()
    optimizer.step()
    return optimizer


def test_checkpoints_hold_what_one_process_saves_and_load_back(
    tiny_model_dir: Path, tmp_path: Path, single_process_group: None
) -> None:
    """The optimizer state of a sharded module equals a plain module's ``Optimizer.state_dict`` after the
    same step (keys are optimizer positions), and before any step it is the untouched empty state; a
    plain module's checkpoint loads into a fresh sharded module: weights, moments and step."""
    untouched = _module(tiny_model_dir, sharded=True)
    optimizer = torch.optim.AdamW(list(untouched.policy.parameters()), lr=1e-2)
    assert _strategy(untouched, optimizer).optimizer_state(optimizer) == optimizer.state_dict()
    assert not optimizer.state  # saving took no step (torch's gatherer takes one with lr 0)
    plain = _module(tiny_model_dir, sharded=False)
    plain_optimizer = _trained(plain)
    sharded = _module(tiny_model_dir, sharded=True)
    sharded_optimizer = _trained(sharded)
    saved = _strategy(sharded, sharded_optimizer).optimizer_state(sharded_optimizer)
    expected = plain_optimizer.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(saved["state"][index][name], value, msg=f"{index}.{name}")

    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": plain.state_dict(), "optimizer_states": [expected], "global_step": 1}, path)
    fresh = _module(tiny_model_dir, sharded=True)
    optimizer = torch.optim.AdamW(list(fresh.policy.parameters()), lr=1e-2)
    strategy = _strategy(fresh, optimizer)
    rest = strategy.load_checkpoint(path)
    assert rest["global_step"] == 1 and "state_dict" not in rest
    loaded = _full(fresh.policy)
    for name, value in plain.policy.state_dict().items():
        torch.testing.assert_close(loaded[name], value, msg=name)
    reloaded = strategy.optimizer_state(optimizer)
    for index, state in expected["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(reloaded["state"][index][name], value, msg=f"{index}.{name}")


def test_a_checkpoint_of_another_model_or_optimizer_is_refused_by_name(
    tiny_model_dir: Path, tmp_path: Path, single_process_group: None
) -> None:
    """As one process refuses them: missing or extra weights, other parameter groups, no optimizer
    state to resume from."""
    module = _module(tiny_model_dir, sharded=True)
    full = _full(module)
    optimizer = torch.optim.SGD(list(module.policy.parameters()), lr=0.1)
    strategy = _strategy(module, optimizer)
    state = optimizer.state_dict()
    two_groups = {
        "state": {},
        "param_groups": [{**group, "params": group["params"][:1]} for group in [state["param_groups"][0]]]
        + [{**state["param_groups"][0], "params": state["param_groups"][0]["params"][1:]}],
    }
    cases = {
        "lacks": ({k: v for k, v in full.items() if "layers.1." not in k}, [state]),
        "extra": ({**full, "policy.extra.weight": torch.zeros(1)}, [state]),
        "groups": (full, [two_groups]),
        "no_optimizer": (full, []),
    }
    expected = {
        "lacks": r"lacks \d+ of the module's weights, e\.g\. policy\.model\.layers\.1\.",
        "extra": r"holds 1 weights the module has not, e\.g\. policy\.extra\.weight",
        "groups": r"parameter groups of sizes \[1, \d+\], the optimizer \[\d+\]",
        "no_optimizer": r"holds 0 optimizer states for 1 optimizers",
    }
    for name, (weights, optimizer_states) in cases.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": weights, "optimizer_states": optimizer_states}, path)
        with pytest.raises(ConfigError, match=rf"checkpoint .*{name}\.ckpt.*{expected[name]}"):
            strategy.load_checkpoint(path)


def test_the_merge_from_a_state_dict_equals_the_merge_of_a_copy(
    tiny_model_dir: Path, single_process_group: None
) -> None:
    """:func:`merged_from_state_dict` on a policy sharded in place (FSDP2 classes) gives the weights
    :func:`merged_copy` gives for the same plain policy, rotary tables included."""
    options = LoraOptions(rank=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    plain = PreferenceModule(str(tiny_model_dir), lora=options)
    plain.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in plain.policy.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, where merging changes nothing
                param.copy_(torch.randn(param.shape, generator=generator))
    expected = merged_copy(plain.policy)
    sharded = PreferenceModule(str(tiny_model_dir), lora=options)
    sharded.configure_model()
    sharded.policy.load_state_dict(plain.policy.state_dict())
    shard_models(sharded, init_device_mesh("cpu", (1,)))
    assert isinstance(sharded.policy.get_base_model(), FSDPModule)
    merged = merged_from_state_dict(sharded.policy, _full(sharded.policy))
    assert type(merged) is type(expected)
    actual = merged.state_dict()
    assert actual.keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(actual[name], tensor, msg=name)
    for (name, buffer), (_, expected_buffer) in zip(
        merged.named_buffers(), expected.named_buffers(), strict=True
    ):
        torch.testing.assert_close(buffer, expected_buffer, msg=name)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(actual[name], base[name]) for name in base)


def test_gather_dtype_follows_the_precision_and_gathers_in_it(
    tiny_model_dir: Path, single_process_group: None
) -> None:
    """``auto`` gathers bfloat16 under bf16-mixed (float16 under 16-mixed, else the weights' dtype); the
    shards stay float32 (what the optimizer updates) and the gathered weights are bfloat16."""
    assert resolve_gather_dtype("auto", "bf16-mixed") is torch.bfloat16
    assert resolve_gather_dtype("auto", "16-mixed") is torch.float16
    assert resolve_gather_dtype("auto", "32-true") is None
    assert resolve_gather_dtype("float32", "bf16-mixed") is torch.float32
    module = PreferenceModule(str(tiny_model_dir), beta=0.5)
    module.configure_model()
    shard_models(module, init_device_mesh("cpu", (1,)), gather_dtype=torch.bfloat16)
    assert {param.dtype for param in module.parameters()} == {torch.float32}
    with torch.no_grad(), local_forwards(module):
        assert {param.dtype for param in module.policy.parameters()} == {torch.bfloat16}
        assert {param.dtype for param in module.reference.parameters()} == {torch.bfloat16}
        logps = module.reference.sequence_logprobs(
            *(_batch()[key] for key in ("input_ids", "attention_mask", "completion_mask")),
            length_normalize=True,
            chunk_size=64,
        )
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()


def test_a_root_first_run_in_local_forwards_is_set_up_as_a_training_forward_sets_it_up(
    tiny_model_dir: Path, single_process_group: None
) -> None:
    """A measurement before the first training forward (step 0) must leave each root as its first
    training forward would have: not resharding after forward (FSDP's choice for a root it sets up
    itself), the reference's root resharding. A root set up inside would keep the local forwards'
    setting, and with 2 processes, one of which ran no local forward, their collectives then differ."""
    first_trained, first_measured = (_module(tiny_model_dir, sharded=True) for _ in range(2))
    batch = _batch()
    with torch.no_grad():
        first_trained.forward_pairs(batch)
        with local_forwards(first_measured):
            first_measured.forward_pairs(batch)
    for module in (first_trained, first_measured):
        module.forward_pairs(batch)[0].backward()
    trained, measured = (
        [_resharding(root) for root in (module.policy, module.reference.model)]
        for module in (first_trained, first_measured)
    )
    assert measured == trained
    assert trained[0][1] == [None]  # the policy root stays gathered until its backward
    assert trained[1][1] != [None]  # the frozen reference's root reshards after forward


def _forward_records(model: torch.nn.Module) -> tuple[int, int]:
    """How many unit forwards FSDP holds for ``model``'s next backward: in the root's list and in its
    units' own."""
    state = model._get_fsdp_state()
    indices = sum(
        len(group._post_forward_indices)
        for unit in state._state_ctx.all_states
        for group in unit._fsdp_param_groups
    )
    return len(state._comm_ctx.post_forward_order), indices


def test_the_frozen_references_forward_records_are_dropped_after_each_forward(
    tiny_model_dir: Path, single_process_group: None
) -> None:
    """FSDP records every unit's forward until a backward clears them; the reference has no backward."""
    module = _module(tiny_model_dir, sharded=True)
    units = 1 + len(module.policy.model.layers)
    with torch.no_grad():
        for _ in range(3):
            module.forward_pairs(_batch())
    assert _forward_records(module.reference.model) == (0, 0)
    # The policy's records, as FSDP keeps them for its backward: what the reference's would be.
    assert _forward_records(module.policy) == (3 * units, 3 * units)
    with torch.no_grad(), local_forwards(module):  # the reference's units stay gathered meanwhile
        module.forward_pairs(_batch())
        assert _forward_records(module.reference.model) == (0, 0)
        assert not any(isinstance(param, DTensor) for param in module.reference.parameters())
    loss, _ = module.forward_pairs(_batch())
    loss.backward()
    assert _forward_records(module.policy) == (0, 0)
