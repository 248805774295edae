"""The pairwise collator: row order, padding and masks."""

from __future__ import annotations

import pytest
import torch

from ipo_lightning.data.collator import PairwiseCollator

PAD = 0


def test_layout_chosen_rows_then_rejected_rows() -> None:
    features = [
        {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9, 10], "preference_prob": 0.9},
        {"prompt_ids": [11], "chosen_ids": [12, 13], "rejected_ids": [14], "preference_prob": 1.0},
    ]
    batch = PairwiseCollator(pad_token_id=PAD)(features)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, PAD, PAD],  # pair 0 chosen
        [11, 12, 13, PAD, PAD],  # pair 1 chosen
        [5, 6, 8, 9, 10],  # pair 0 rejected
        [11, 14, PAD, PAD, PAD],  # pair 1 rejected
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [False, False, True, False, False],
        [False, True, True, False, False],
        [False, False, True, True, True],
        [False, True, False, False, False],
    ]
    assert batch["preference_prob"].tolist() == pytest.approx([0.9, 1.0])
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool and batch["preference_prob"].dtype == torch.float32
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "preference_prob"}


def test_padding_is_dynamic_and_pad_may_equal_eos() -> None:
    eos = 3
    features = [{"prompt_ids": [4], "chosen_ids": [5, eos], "rejected_ids": [eos]}]
    batch = PairwiseCollator(pad_token_id=eos)(features)
    assert batch["input_ids"].shape == (2, 3)  # longest row, not some max_length
    assert batch["input_ids"].tolist() == [[4, 5, eos], [4, eos, eos]]
    # The real EOS of the rejected row is a completion token; the pad after it is not.
    assert batch["completion_mask"].tolist() == [[False, True, True], [False, True, False]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["preference_prob"].tolist() == [1.0]


def test_reference_log_prob_sums_and_counts_are_passed_through() -> None:
    def feature(completion: int, sums: tuple[float, float], counts: tuple[int, int]) -> dict:
        return {
            "prompt_ids": [1],
            "chosen_ids": [completion],
            "rejected_ids": [completion + 1],
            "ref_chosen_logp_sum": sums[0],
            "ref_rejected_logp_sum": sums[1],
            "ref_chosen_token_count": counts[0],
            "ref_rejected_token_count": counts[1],
        }

    batch = PairwiseCollator(pad_token_id=PAD)(
        [feature(2, (-1.5, -2.0), (3, 4)), feature(4, (-0.5, -3.0), (1, 2))]
    )
    assert batch["ref_chosen_logp_sum"].tolist() == [-1.5, -0.5]
    assert batch["ref_rejected_logp_sum"].tolist() == [-2.0, -3.0]
    assert batch["ref_chosen_token_count"].tolist() == [3, 1]
    assert batch["ref_rejected_token_count"].tolist() == [4, 2]
    # Without them on every feature, none are added (a batch never mixes sources).
    partial = PairwiseCollator(pad_token_id=PAD)(
        [feature(2, (-1.5, -2.0), (3, 4)), {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}]
    )
    assert "ref_chosen_logp_sum" not in partial
