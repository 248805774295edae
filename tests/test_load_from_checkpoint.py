"""``Module.load_from_checkpoint(<run>/checkpoints/*.ckpt)`` of a CLI run gives back the trained model, for
every method: Lightning calls ``configure_model`` (where the modules build their models) before it loads
the weights, so the loaded module scores a batch as the trained one did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ipo_lightning.batching import batch_scores
from ipo_lightning.cli import PreferenceCLI
from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.module import PreferenceModule
from ipo_lightning.reward_model import RewardModelModule
from ipo_lightning.rl.online import OnlineModule
from ipo_lightning.rl.rloo import RLOOModule
from tests.helpers import fit_config, polite_pairs, write_config, write_jsonl

REWARD = "tests.reward_fixtures:length_reward"
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
CASES: dict[str, tuple[type, str, dict[str, Any]]] = {
    "preference": (PreferenceModule, "policy", {}),
    "preference-lora": (PreferenceModule, "policy", {"lora": LORA}),
    "reward_model": (RewardModelModule, "model", {}),
    "rloo": (RLOOModule, "policy", {"reward": REWARD, "max_new_tokens": 4}),
    "online": (OnlineModule, "policy", {"reward": REWARD, "max_new_tokens": 4}),
}


def _fit(tmp_path: Path, model_dir: Path, method: str, model: dict[str, Any]) -> PreferenceCLI:
    """Two optimizer steps of ``method`` through the CLI (in this process), a checkpoint at the end."""
    if method in ("rloo", "online"):
        topics = ("the sea", "bread", "a fox", "the moon")
        prompts = [{"prompt": f"Human: tell me about {topic}. Assistant:"} for topic in topics]
        train = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    else:
        train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(8))
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        trainer={"max_steps": 2, "limit_val_batches": 0, "enable_model_summary": False},
        model={"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}, **model},
        data={"batch_size": 2},
        divergence={"enabled": False},
        export={"enabled": False},
        wandb={"enabled": False},
    )
    config["method"] = method.split("-")[0]
    return PreferenceCLI(args=["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_load_from_checkpoint_gives_the_trained_module(
    tmp_path: Path, tiny_model_dir: Path, case: str
) -> None:
    module_class, attribute, model = CASES[case]
    cli = _fit(tmp_path, tiny_model_dir, case, model)
    (checkpoint,) = (tmp_path / "runs" / "version_0" / "checkpoints").glob("*.ckpt")
    trained = cli.model
    assert type(trained) is module_class and trained.global_step == 2

    restored = module_class.load_from_checkpoint(checkpoint)
    assert type(restored) is module_class
    ours, theirs = getattr(trained, attribute), getattr(restored, attribute)
    assert type(theirs) is type(ours)
    trained_state, restored_state = ours.state_dict(), theirs.state_dict()
    assert set(restored_state) == set(trained_state)
    for name, tensor in trained_state.items():
        assert torch.equal(restored_state[name], tensor), name

    features = [
        {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]},
        {"prompt_ids": [20, 21], "chosen_ids": [22, 23, 24], "rejected_ids": [25]},
    ]
    batch = PairwiseCollator(pad_token_id=0)(features)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        if attribute == "model":  # the reward model: one score per row
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            expected, loaded = ours(**inputs).logits, theirs(**inputs).logits
        else:
            rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            expected = batch_scores(ours, *rows, batching="padded").token_logps
            loaded = batch_scores(theirs, *rows, batching="padded").token_logps
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
    # Trained weights, not the base model's: a module built fresh from the same settings differs.
    fresh = module_class(**restored.hparams)
    fresh.configure_model()
    fresh_state = getattr(fresh, attribute).state_dict()
    assert any(not torch.equal(fresh_state[name], tensor) for name, tensor in trained_state.items())
