"""Strategy configs: composition, validation on CPU, and FSDP's handling of the frozen reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoModelForCausalLM
from transformers.distributed.fsdp import is_fsdp_managed_module

from ipo_lightning.batching import batch_scores
from ipo_lightning.cli import main
from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.distributed import PreferenceFSDPStrategy, full_weights_for_local_forwards
from ipo_lightning.module import PreferenceModule
from ipo_lightning.reference import FrozenReference
from tests.helpers import REPO, fit_config, polite_pairs, run_main, write_config, write_jsonl

STRATEGY_CONFIGS = sorted((REPO / "configs" / "strategy").glob("*.yaml"))
EXPECTED_CLASS = {
    "ddp.yaml": "lightning.pytorch.strategies.DDPStrategy",
    "fsdp.yaml": "ipo_lightning.distributed.PreferenceFSDPStrategy",
    "fsdp2.yaml": "ipo_lightning.fsdp2.PreferenceFSDP2Strategy",
    "deepspeed_zero2.yaml": "ipo_lightning.distributed.PreferenceDeepSpeedStrategy",
    "deepspeed_zero3.yaml": "ipo_lightning.distributed.PreferenceDeepSpeedStrategy",
}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_every_strategy_config_is_tested() -> None:
    assert {path.name for path in STRATEGY_CONFIGS} == set(EXPECTED_CLASS)


@pytest.mark.parametrize("strategy", STRATEGY_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("training", ["quickstart.yaml", "qwen2.5-0.5b-ipo.yaml"])
def test_strategy_config_composes_with_training_configs(
    strategy: Path, training: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config <training> --config <strategy>`` parses (keys, types, init args) without deepspeed."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", str(REPO / "configs" / training), "--config", str(strategy), "--print_config"]
        )
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"]["class_path"] == EXPECTED_CLASS[strategy.name]
    assert printed["trainer"]["accelerator"] == "gpu"
    # The training config's own choices survive the composition.
    trained = yaml.safe_load((REPO / "configs" / training).read_text())
    assert printed["model"]["model_name_or_path"] == trained["model"]["model_name_or_path"]


def _tiny_config(tmp_path: Path, model_dir: Path) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    config = fit_config(tmp_path, model_dir, train, trainer={"logger": False})
    return write_config(tmp_path / "config.yaml", config)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.strategy", "fsdp"], "trainer.strategy='fsdp' would flatten the frozen reference"),
        (["--trainer.strategy", "deepspeed_stage_3"], "configs/strategy/deepspeed_zero2.yaml"),
    ],
    ids=["lightning-fsdp", "lightning-deepspeed"],
)
def test_strategies_that_break_the_reference_are_refused_by_name(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code, err = run_main(["fit", "--config", str(_tiny_config(tmp_path, tiny_model_dir)), *args], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed: the missing-package error cannot occur")
def test_deepspeed_config_without_deepspeed_is_one_clear_error(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _tiny_config(tmp_path, tiny_model_dir)
    zero3 = str(REPO / "configs" / "strategy" / "deepspeed_zero3.yaml")
    code, err = run_main(["fit", "--config", str(config), "--config", zero3], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "needs the deepspeed package" in lines[0] and "trainer.strategy" in lines[0]


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed here; scripts/gpu_check.sh runs it")
def test_deepspeed_strategy_instantiates() -> None:
    from ipo_lightning.distributed import PreferenceDeepSpeedStrategy

    assert PreferenceDeepSpeedStrategy(stage=3).zero_stage_3


def test_fsdp_shards_the_policy_and_leaves_the_reference_frozen(
    tiny_model_dir: Path, single_process_group: None
) -> None:
    """The wrap policy on a real module: policy model and decoder layers are FSDP units; the reference
    is ignored (replicated, eval, no grad) and never reaches FSDP's state-dict hooks."""
    module = PreferenceModule(str(tiny_model_dir))
    module.configure_model()
    strategy = PreferenceFSDPStrategy()
    strategy.parallel_devices = [torch.device("cpu")]
    wrapped = strategy._setup_model(module)

    assert isinstance(module.policy, FSDP)  # the policy model is its own unit...
    layers = module.policy.module.model.layers
    assert all(isinstance(layer, FSDP) for layer in layers)  # ...and so is each decoder layer
    reference = module.reference
    assert isinstance(reference, FrozenReference)
    assert not any(isinstance(sub, FSDP) for sub in reference.modules())
    wrapped.train()  # what Lightning does at fit start and after every validation
    assert not reference.training and not any(sub.training for sub in reference.modules())
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in module.policy.parameters())  # use_orig_params: real parameters

    # Checkpoint and export path: the full state dict holds the policy only (this raised a KeyError when
    # the reference was an FSDP unit), under the keys the export cuts out (full_policy_state_dict).
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
        checkpoint_state = wrapped.state_dict()
    assert checkpoint_state and not any(key.startswith("reference.") for key in checkpoint_state)
    policy_state = {
        k.removeprefix("policy."): v for k, v in checkpoint_state.items() if k.startswith("policy.")
    }
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert set(policy_state) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(policy_state[name], tensor, msg=name)


def test_full_weights_for_local_forwards_runs_the_plain_policy(
    tiny_model_dir: Path, single_process_group: None
) -> None:
    """Inside the context the FSDP-wrapped policy is the plain Hugging Face model (no unit left), not
    FSDP-managed for ``generate()`` (which would sync every decoding step across ranks), and scores and
    samples as the unwrapped model does; on exit every unit and mark is back in place."""
    module = PreferenceModule(str(tiny_model_dir))
    module.configure_model()
    strategy = PreferenceFSDPStrategy()
    strategy.parallel_devices = [torch.device("cpu")]
    strategy.model = strategy._setup_model(module)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    features = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]}]
    batch = PairwiseCollator(pad_token_id=0)(features)
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    prompt = torch.tensor([[5, 6, 7]])
    marked = [m for m in module.policy.module.modules() if is_fsdp_managed_module(m)]
    assert module.policy.module.model.embed_tokens in marked  # what generate() reads, set by FSDP
    with torch.no_grad():
        expected = batch_scores(plain, *rows, batching="prefix_shared").token_logps
        expected_tokens = plain.generate(prompt, max_new_tokens=4, do_sample=False)
        with full_weights_for_local_forwards(strategy):
            policy = module.policy
            assert type(policy) is type(plain) and not any(isinstance(m, FSDP) for m in policy.modules())
            assert policy.lm_head.weight.shape == plain.lm_head.weight.shape
            assert not any(is_fsdp_managed_module(m) for m in policy.modules())
            policy.eval()
            scores = batch_scores(policy, *rows, batching="prefix_shared").token_logps
            tokens = policy.generate(prompt, max_new_tokens=4, do_sample=False)
            policy.train()
    torch.testing.assert_close(scores, expected)
    assert torch.equal(tokens, expected_tokens)
    assert isinstance(module.policy, FSDP)
    assert all(isinstance(layer, FSDP) for layer in module.policy.module.model.layers)
    assert [m for m in module.policy.module.modules() if is_fsdp_managed_module(m)] == marked
