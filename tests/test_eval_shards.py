"""Validation/test sets split over ranks: equal shares, repeats weighted 0, every item counted once."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.data.eval_shards import WEIGHT, PaddedEvalSet, eval_loaders, eval_shards
from ipo_lightning.errors import ConfigError
from ipo_lightning.metrics import PreferenceMetrics
from ipo_lightning.reward_model import RewardMetrics
from ipo_lightning.rl.data import PROMPT_INDEX, collate_prompts
from ipo_lightning.rl.module import ROLLOUT_METRICS, OnPolicyModule
from ipo_lightning.rl.rollout import Rollout


def _items(count: int) -> list[dict[str, int]]:
    return [{"item": i} for i in range(count)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 2, 5, 7, 8, 9])
def test_every_rank_gets_an_equal_share_and_every_item_counts_once(count: int, world: int) -> None:
    shares = []
    for rank in range(world):
        padded, sampler = eval_shards(_items(count), num_replicas=world, rank=rank)
        assert isinstance(sampler, DistributedSampler)  # so Lightning keeps it
        shares.append([padded[position] for position in sampler])
    assert [len(share) for share in shares] == [math.ceil(count / world)] * world
    real = sorted(item["item"] for share in shares for item in share if item[WEIGHT] == 1.0)
    assert real == list(range(count))
    repeats = [item for share in shares for item in share if item[WEIGHT] == 0.0]
    assert len(repeats) == math.ceil(count / world) * world - count
    # The same items per rank, in the same order, as Lightning's own DistributedSampler(shuffle=False)
    # deals out: only the weights are new.
    for rank, share in enumerate(shares):
        plain = DistributedSampler(range(count), num_replicas=world, rank=rank, shuffle=False)
        assert [item["item"] for item in share] == list(plain)


def test_eval_loaders_give_this_ranks_share_of_each_named_set_and_name_a_missing_one() -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # rank 0 of 2
    sets = {"a": _items(5), "b": _items(2)}

    def make_loader(
        dataset: Dataset, batch_size: int, sampler: DistributedSampler | None = None
    ) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)

    loaders = eval_loaders(sets, ["b", "a"], "validate", trainer, make_loader, 2)
    batches = [[batch["item"].tolist() for batch in loader] for loader in loaders]
    assert batches == [[[0]], [[0, 2], [4]]]  # rank 0 of 2: positions 0, 2, 4 of each set, in name order
    weights = [batch[WEIGHT].tolist() for batch in loaders[1]]
    assert weights == [[1.0, 1.0], [1.0]]
    # Without a trainer: one replica, the whole set.
    (whole,) = eval_loaders(sets, ["a"], "test", None, make_loader, 8)
    assert [batch["item"].tolist() for batch in whole] == [[0, 1, 2, 3, 4]]
    with pytest.raises(ConfigError, match=r"^data set 'c' is not built: call setup\('test'\) first$"):
        eval_loaders(sets, ["a", "c"], "test", trainer, make_loader, 2)


def test_the_padded_view_copies_items_and_refuses_positions_past_its_end() -> None:
    items = _items(3)
    padded = PaddedEvalSet(items, num_replicas=2)
    assert len(padded) == 4
    assert padded[3] == {"item": 0, WEIGHT: 0.0}
    assert items[0] == {"item": 0}  # the set's own item is untouched
    with pytest.raises(IndexError, match="position 4 out of range for 4 positions"):
        padded[4]


def test_the_collators_pass_the_weights_on_and_add_none_to_training_batches() -> None:
    pair = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}
    collate = PairwiseCollator(pad_token_id=0)
    batch = collate([{**pair, WEIGHT: 1.0}, {**pair, WEIGHT: 0.0}])
    assert batch[WEIGHT].tolist() == [1.0, 0.0] and batch[WEIGHT].dtype == torch.float32
    assert WEIGHT not in collate([pair, pair])
    prompt = {PROMPT_INDEX: 0, "prompt_ids": [1, 2], "prompt_json": '"hi"'}
    assert collate_prompts([{**prompt, WEIGHT: 0.0}])[WEIGHT].tolist() == [0.0]
    assert WEIGHT not in collate_prompts([prompt])


def test_preference_and_reward_metrics_over_two_ranks_shares_equal_the_mean_over_the_set() -> None:
    values = torch.tensor([0.5, -1.25, 2.0, 3.5, -0.75])  # one value per pair, 5 pairs
    scores = torch.tensor([0.3, 0.1, -0.4, 0.9, 0.2]), torch.tensor([0.1, 0.5, -0.8, 0.0, 0.4])
    preference, reward = PreferenceMetrics(("loss",)), RewardMetrics()
    for rank in range(2):  # both ranks' shares into one metric: the sums the all-reduce adds
        padded, sampler = eval_shards([{"pair": i} for i in range(5)], num_replicas=2, rank=rank)
        loader = DataLoader(padded, batch_size=2, sampler=sampler)
        for batch in loader:
            rows = batch["pair"]
            preference.update({"loss": values[rows]}, {"loss": batch[WEIGHT]})
            reward.update(scores[0][rows], scores[1][rows], values[rows], batch[WEIGHT])
    assert preference.compute()["loss"].item() == pytest.approx(values.mean().item(), abs=1e-6)
    every = torch.cat(scores)
    expected = {
        "loss": values.mean(),
        "rm/accuracy": (scores[0] > scores[1]).float().mean(),
        "rm/margin": (scores[0] - scores[1]).mean(),
        "rm/reward_mean": every.mean(),
        "rm/reward_std": every.std(unbiased=False),
    }
    computed = reward.compute()
    for name, value in expected.items():
        assert computed[name].item() == pytest.approx(value.item(), abs=1e-6), name


def test_a_repeated_prompt_weighs_nothing_in_any_rollout_metric() -> None:
    # Two prompts, k = 2 samples each; the second prompt is a repeat (weight 0). Its samples' values and
    # their 3 + 1 tokens' entropies must not move any mean.
    lengths = torch.tensor([[2, 1], [3, 1]])
    rollout = Rollout(
        prompts=[],
        completions=[],
        rewards=torch.tensor([[1.0, 3.0], [50.0, 70.0]]),
        shaped_rewards=torch.zeros(2, 2),
        policy_logps=torch.tensor([[-1.0, -2.0], [-9.0, -9.0]]),
        reference_logps=torch.tensor([[-1.5, -2.5], [0.0, 0.0]]),
        lengths=lengths,
        ended=torch.tensor([[True, False], [True, True]]),
        entropy=torch.tensor([1.0, 2.0, 4.0, 90.0, 90.0, 90.0, 90.0]),
    )
    weights = OnPolicyModule.rollout_weights(rollout, torch.tensor([1.0, 0.0]))
    metrics = PreferenceMetrics(ROLLOUT_METRICS)
    metrics.update(OnPolicyModule.rollout_values(rollout), weights)
    computed = {name: value.item() for name, value in metrics.compute().items()}
    expected = {"reward": 2.0, "kl": 0.5, "entropy": 7 / 3, "length": 1.5, "eos_rate": 0.5}
    assert computed == pytest.approx(expected)
