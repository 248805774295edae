"""The generation evaluation: metric math against hand-computed values, the sampled sequence KL against a
direct computation, logged metrics equal to a recomputation from the samples file, ties and zero KL at
step 0, and a bad reward stopping the run at start-up."""

from __future__ import annotations

import csv
import gc
import json
import math
import random
import statistics
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipo_lightning.callbacks import GenerationEval
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.prompts import HeldOutPrompt
from ipo_lightning.errors import ConfigError
from ipo_lightning.evaluation import EvalOptions, judge_prompts, sample_logprobs, set_result, with_log_ratios
from ipo_lightning.generation_metrics import Z_95, distinct_n, repetition, set_metrics, win_rate
from ipo_lightning.lora import LoraOptions
from ipo_lightning.module import PreferenceModule
from ipo_lightning.rewards import load_reward
from tests.helpers import polite_pairs, write_jsonl

REWARD = "tests.test_generation_eval:distinct_tokens"
SPLIT_GENERATION = {
    "reward": REWARD,
    "prompts": 3,
    "samples_per_prompt": 2,
    "max_new_tokens": 6,
    "batch_size": 4,
    "every_n_steps": 1,
}
"""The ``generation`` section of the multi-process tests: 3 prompts, which 2 ranks split unevenly."""


def distinct_tokens(prompts: list[str], completions: list[str]) -> list[float]:
    """A tiny reward: the number of distinct characters of the completion (ties are common)."""
    return [float(len(set(completion))) for completion in completions]


def wrong_length(prompts: list[str], completions: list[str]) -> list[float]:
    """A broken reward: one value too few."""
    return [0.0] * (len(completions) - 1)


def not_finite(prompts: list[str], completions: list[str]) -> list[float]:
    """A broken reward: NaN scores."""
    return [math.nan] * len(completions)


def raises(prompts: list[str], completions: list[str]) -> list[float]:
    """A broken reward: its own code fails."""
    raise KeyError("no such rubric")


# ------------------------------------------------------------------ metric math


def test_distinct_2_pools_bigrams_over_samples() -> None:
    # Bigrams: (1,2) (2,1) (1,2) | (1,2) (2,3) | none -> 3 distinct of 5.
    assert distinct_n([[1, 2, 1, 2], [1, 2, 3], [7]]) == pytest.approx(3 / 5)
    assert distinct_n([[1], []]) == 0.0


def test_repetition_is_the_mean_share_of_repeated_trigrams_within_a_sample() -> None:
    # [1,2,1,2,1,2]: trigrams 121 212 121 212 -> 2 distinct of 4 -> 0.5; [1,2,3,4]: 0; [5,5]: no trigram.
    assert repetition([[1, 2, 1, 2, 1, 2], [1, 2, 3, 4], [5, 5]]) == pytest.approx(0.25)
    assert repetition([[5, 5]]) == 0.0


def test_set_metrics_against_hand_computed_values() -> None:
    policy = [3.0, 1.0, 2.0, 2.0]
    reference = [1.0, 2.0, 2.0, 0.0]  # win, loss, tie, win -> outcomes 1, 0, 0.5, 1
    metrics = set_metrics(
        policy,
        reference,
        content_tokens=[[1, 2], [1, 2], [3], [4, 5, 4, 5, 4]],
        lengths=[3, 2, 2, 4],
        ended=[True, False, True, False],
        greedy_rewards=[4.0, 1.0],
        samples_per_prompt=2,
    )
    # Two prompts of two samples: mean outcomes 0.5 and 0.75, sd 0.25 / sqrt(2), over sqrt(2) prompts.
    half = Z_95 * 0.125
    assert metrics["win_rate"] == pytest.approx(0.625)
    assert metrics["win_rate_ci_low"] == pytest.approx(0.625 - half)
    assert metrics["win_rate_ci_high"] == pytest.approx(0.625 + half)
    assert metrics["reward"] == 2.0 and metrics["reference_reward"] == 1.25
    assert metrics["greedy_reward"] == 2.5
    assert metrics["length"] == 2.75 and metrics["eos_rate"] == 0.5
    assert metrics["distinct_2"] == pytest.approx(3 / 6)  # 12 12 45 54 45 54: 3 distinct of 6
    assert metrics["repetition"] == pytest.approx(1 / 3)  # only the last has trigrams: 454 545 454


def test_win_rate_and_its_confidence_interval_by_direct_calculation() -> None:
    policy = [3.0, 1.0, 2.0, 2.0, 5.0]
    reference = [1.0, 2.0, 2.0, 0.0, 4.0]  # win, loss, tie, win, win
    result = win_rate(policy, reference)
    outcomes = [1.0, 0.0, 0.5, 1.0, 1.0]
    mean = sum(outcomes) / 5
    sd = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / 4)
    assert result.win_rate == pytest.approx(0.7)
    assert result.ci_low == pytest.approx(mean - 1.959964 * sd / math.sqrt(5), abs=1e-6)
    assert result.ci_high == pytest.approx(min(1.0, mean + 1.959964 * sd / math.sqrt(5)), abs=1e-6)
    assert (result.wins, result.ties, result.losses, result.prompts) == (3, 1, 1, 5)


def test_the_win_rate_interval_counts_prompts_not_samples() -> None:
    # Three prompts whose four samples agree: as evidence, three outcomes, not twelve.
    policy = [1.0] * 4 + [0.0] * 4 + [1.0] * 4
    reference = [0.0] * 12
    result = win_rate(policy, reference, samples_per_prompt=4)
    half = Z_95 * statistics.stdev([1.0, 0.5, 1.0]) / math.sqrt(3)
    assert result.win_rate == pytest.approx(2.5 / 3)
    assert (result.ci_low, result.ci_high) == pytest.approx((2.5 / 3 - half, 1.0))
    assert result.prompts == 3 and (result.wins, result.ties, result.losses) == (8, 4, 0)
    naive = win_rate(policy, reference)  # the twelve outcomes as if independent: far narrower
    assert naive.ci_high - naive.ci_low < 0.6 * (result.ci_high - result.ci_low)
    with pytest.raises(ValueError, match="prompts of 5 samples"):
        win_rate(policy, reference, samples_per_prompt=5)


def test_the_win_rate_interval_covers_the_true_rate_about_95_percent_of_the_time() -> None:
    # Each prompt has its own win probability (uniform in [0, 1], so the true rate is 1/2) and its k
    # samples are drawn from it: samples of a prompt are correlated, as a policy's samples are.
    generator = random.Random(0)
    prompts, k, repeats = 32, 4, 1000
    covered = {"per prompt": 0, "per sample": 0}
    for _ in range(repeats):
        chances = [generator.random() for _ in range(prompts)]
        policy = [float(generator.random() < chance) for chance in chances for _ in range(k)]
        reference = [0.5] * len(policy)  # a win when the policy scores 1, a loss when it scores 0
        for name, clusters in (("per prompt", k), ("per sample", 1)):
            result = win_rate(policy, reference, samples_per_prompt=clusters)
            covered[name] += result.ci_low <= 0.5 <= result.ci_high
    assert 0.93 <= covered["per prompt"] / repeats <= 0.97
    assert covered["per sample"] / repeats < 0.88  # the outcomes taken as independent under-cover


# ------------------------------------------------------------------ sampled sequence KL


def _direct_logprob(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """log model(completion | prompt): one unpadded forward, log-softmax, the drawn tokens summed."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return float(logps.gather(-1, torch.tensor(completion)[:, None]).sum())


def test_gen_kl_is_the_mean_log_ratio_of_the_policy_samples_computed_directly(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Another policy: its output layer favours EOS (so some samples end with it, some do not).
    head = torch.nn.Linear(policy.lm_head.in_features, policy.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(policy.lm_head.weight * 1.5)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 4.0
    policy.lm_head = head
    policy.train()  # the evaluation scores in eval mode and puts the mode back
    texts = [f"Human: tell me about {topic}. Assistant:" for topic in ("the sea", "bread", "a fox")]
    prompts = [HeldOutPrompt(text, tokenizer(text)["input_ids"], None) for text in texts]
    options = EvalOptions(samples_per_prompt=4, greedy=False, max_new_tokens=8, batch_size=5)
    indices = range(len(prompts))
    reward = load_reward(REWARD, option="--reward")
    mine = judge_prompts(policy, tokenizer, prompts, indices, reward, options)
    theirs = judge_prompts(reference, tokenizer, prompts, indices, reward, options)
    scored = with_log_ratios(
        mine,
        sample_logprobs(policy, prompts, mine, batch_size=5),
        sample_logprobs(reference, prompts, mine, batch_size=5),
    )
    assert policy.training and policy.model.layers[0].training
    result = set_result("a", 0, scored, theirs)

    completions = [(p.ids, c) for p, r in zip(prompts, mine, strict=True) for c in r.samples]
    ended = [c.ended for _, c in completions]
    assert any(ended) and not all(ended)
    assert all(c.token_ids[-1] == tokenizer.eos_token_id for _, c in completions if c.ended)
    direct = [
        _direct_logprob(policy.eval(), ids, c.token_ids) - _direct_logprob(reference, ids, c.token_ids)
        for ids, c in completions
    ]
    assert [row["policy_logratio"] for row in result.rows] == pytest.approx(direct, abs=1e-4)
    assert result.metrics["kl"] == pytest.approx(statistics.fmean(direct), abs=1e-4)
    assert result.metrics["kl"] > 0.1  # the two models really differ

    # The reference against itself: every log-ratio is exactly zero.
    same = sample_logprobs(reference, prompts, theirs)
    assert set_result("a", 0, with_log_ratios(theirs, same, same), theirs).metrics["kl"] == 0.0
    # Results never scored have no KL (not a KL of 0).
    assert "kl" not in set_result("a", 0, mine, theirs).metrics


# ------------------------------------------------------------------ during a fit


def _fit(
    tmp_path: Path,
    tiny_model_dir: Path,
    evaluation: GenerationEval,
    lr: float,
    steps: int = 4,
    data_class: type[PreferenceDataModule] = PreferenceDataModule,
    before: tuple[Callback, ...] = (),
    **module_options: Any,
) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(16))
    first = write_jsonl(tmp_path / "a.jsonl", polite_pairs(8, offset=16))
    second = write_jsonl(tmp_path / "b.jsonl", polite_pairs(8, offset=40))
    datamodule = data_class(
        train=DataSource(path=str(train)),
        val={"a": DataSource(path=str(first)), "b": DataSource(path=str(second))},
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=4,
    )
    module = PreferenceModule(
        str(tiny_model_dir),
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
        lr_schedule="constant",
        **module_options,
    )
    logger = CSVLogger(tmp_path / "logs", name="")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=2,
        logger=logger,
        callbacks=[*before, evaluation],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return Path(logger.log_dir)


def test_logged_metrics_equal_a_recomputation_from_the_samples_file(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    evaluation = GenerationEval(
        reward=REWARD, prompts=3, samples_per_prompt=2, max_new_tokens=6, batch_size=4, every_n_steps=3
    )
    run = _fit(tmp_path, tiny_model_dir, evaluation, lr=5e-2)
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("gen/reward")]
    # Step 0, step 3 (every_n_steps), and after the validations at steps 2 and 4.
    assert [int(r["step"]) for r in rows] == [0, 2, 3, 4]
    # Each validation's val/ values are at the step of its gen/ values: the optimizer steps taken.
    validations = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/loss")]
    assert [int(r["step"]) for r in validations] == [2, 4]
    assert all(r["val/a/loss"] == r["val/loss"] and r["val/b/loss"] and r["epoch"] for r in validations)
    samples = [json.loads(line) for line in (run / "generation_samples.jsonl").open()]
    assert set(samples[0]) == {
        "step", "set", "prompt", "sample", "policy", "reference",
        "policy_reward", "reference_reward", "policy_tokens", "policy_ended", "policy_logratio",
    }  # fmt: skip
    assert len(samples) == 4 * 2 * 3 * 2  # measurements x sets x prompts x samples
    by_key: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for sample in samples:
        assert sample["policy_reward"] == len(set(sample["policy"]))  # the reward really read the text
        by_key[sample["step"], sample["set"]].append(sample)
    for row in rows:
        step = int(row["step"])
        for name, prefix in (("a", "gen/"), ("a", "gen/a/"), ("b", "gen/b/")):
            part = by_key[step, name]
            policy = [s["policy_reward"] for s in part]
            reference = [s["reference_reward"] for s in part]
            outcomes = [
                1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference, strict=True)
            ]
            assert float(row[prefix + "reward"]) == pytest.approx(sum(policy) / len(policy))
            assert float(row[prefix + "reference_reward"]) == pytest.approx(sum(reference) / len(reference))
            rate = sum(outcomes) / len(outcomes)
            by_prompt: dict[str, list[float]] = defaultdict(list)
            for sample, outcome in zip(part, outcomes, strict=True):
                by_prompt[sample["prompt"]].append(outcome)
            means = [statistics.fmean(values) for values in by_prompt.values()]
            assert [len(values) for values in by_prompt.values()] == [2, 2, 2]
            half = Z_95 * statistics.stdev(means) / math.sqrt(len(means))
            assert float(row[prefix + "win_rate"]) == pytest.approx(rate)
            assert float(row[prefix + "win_rate_ci_low"]) == pytest.approx(max(0.0, rate - half))
            assert float(row[prefix + "win_rate_ci_high"]) == pytest.approx(min(1.0, rate + half))
            lengths = [s["policy_tokens"] for s in part]
            assert float(row[prefix + "length"]) == pytest.approx(sum(lengths) / len(lengths))
            ended = [s["policy_ended"] for s in part]
            assert float(row[prefix + "eos_rate"]) == pytest.approx(sum(ended) / len(ended))
            ratios = [s["policy_logratio"] for s in part]
            assert float(row[prefix + "kl"]) == pytest.approx(sum(ratios) / len(ratios))
            assert row[prefix + "greedy_reward"] != ""
    # The reference's samples are the same at every measurement (generated once, the same seeds).
    reference_texts = {step: [s["reference"] for s in by_key[step, "a"]] for step in (0, 2, 3, 4)}
    assert len({tuple(texts) for texts in reference_texts.values()}) == 1
    # Step 0: the policy is the reference and shares its seeds, so every pair is a tie.
    first = rows[0]
    assert float(first["gen/win_rate"]) == 0.5 and float(first["gen/b/win_rate"]) == 0.5
    assert float(first["gen/win_rate_ci_low"]) == 0.5 == float(first["gen/win_rate_ci_high"])
    assert all(s["policy"] == s["reference"] for s in by_key[0, "a"])
    assert all(s["policy_logratio"] == 0.0 for s in by_key[0, "a"]) and float(first["gen/kl"]) == 0.0
    # Training moved the policy: its later samples differ from the reference's.
    assert any(s["policy"] != s["reference"] for s in by_key[4, "a"])
    assert float(rows[-1]["gen/kl"]) != 0.0
    assert int(evaluation.last_results["a"].rows[0]["step"]) == 4


def test_zero_learning_rate_gives_ties_at_every_measurement(tmp_path: Path, tiny_model_dir: Path) -> None:
    evaluation = GenerationEval(
        reward=REWARD, prompts=2, samples_per_prompt=2, greedy=False, max_new_tokens=5, every_n_steps=0,
        sets=["b"],
    )  # fmt: skip
    run = _fit(tmp_path, tiny_model_dir, evaluation, lr=0.0, steps=2)
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("gen/win_rate")]
    assert [int(r["step"]) for r in rows] == [0, 2]
    assert all(float(r["gen/win_rate"]) == 0.5 for r in rows)
    assert all(float(r["gen/kl"]) == 0.0 for r in rows)  # the policy stays the reference
    assert "gen/b/win_rate" not in rows[0] and "gen/greedy_reward" not in rows[0]  # one set: plain names only
    samples = [json.loads(line) for line in (run / "generation_samples.jsonl").open()]
    assert {s["set"] for s in samples} == {"b"}


@pytest.mark.parametrize(
    "options",
    [
        {"reference": "lora", "lora": LoraOptions(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj"])},
        {"reference": "precomputed"},
    ],
    ids=["lora", "precomputed"],
)
def test_gen_kl_with_the_lora_and_the_precomputed_reference(
    tmp_path: Path, tiny_model_dir: Path, options: dict[str, Any]
) -> None:
    evaluation = GenerationEval(
        reward=REWARD, prompts=2, samples_per_prompt=2, greedy=False, max_new_tokens=5, every_n_steps=0,
        sets=["a"],
    )  # fmt: skip
    L.seed_everything(0)  # peft draws the LoRA A matrices from the global generator
    run = _fit(tmp_path, tiny_model_dir, evaluation, lr=5e-2, steps=2, **options)
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("gen/kl")]
    samples = [json.loads(line) for line in (run / "generation_samples.jsonl").open()]
    for row in rows:
        ratios = [s["policy_logratio"] for s in samples if s["step"] == int(row["step"])]
        assert float(row["gen/kl"]) == pytest.approx(statistics.fmean(ratios))
    # Step 0: the policy is the reference, exactly; step 2: the reference is still the base (the same
    # model scoring twice would give exactly 0), the policy moved.
    assert [int(r["step"]) for r in rows] == [0, 2]
    assert float(rows[0]["gen/kl"]) == 0.0 and abs(float(rows[1]["gen/kl"])) > 1e-6


class _LoadsAtTrainStart(Callback):
    """Notes how many models were loaded when training starts, before the first measurement."""

    def __init__(self, loads: list[weakref.ref]) -> None:
        self.loads = loads
        self.before_training = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before_training = len(self.loads)


@pytest.mark.slow
def test_the_precomputed_reference_is_loaded_once_per_run_and_scores_as_a_live_one(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[weakref.ref] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls: type, *args: Any, **kwargs: Any) -> Any:
        model = real(cls, *args, **kwargs)
        loads.append(weakref.ref(model))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    samples = {}
    for reference in ("precomputed", None):
        evaluation = GenerationEval(
            reward=REWARD, prompts=2, samples_per_prompt=2, greedy=False, max_new_tokens=5, every_n_steps=1,
            sets=["a"],
        )  # fmt: skip
        marker = _LoadsAtTrainStart(loads)
        L.seed_everything(0)
        (tmp_path / str(reference)).mkdir()
        run = _fit(
            tmp_path / str(reference), tiny_model_dir, evaluation, lr=5e-2, steps=3, before=(marker,),
            reference=reference,
        )  # fmt: skip
        samples[reference] = [json.loads(line) for line in (run / "generation_samples.jsonl").open()]
        if reference == "precomputed":
            during = loads[marker.before_training :]
            assert sorted({s["step"] for s in samples[reference]}) == [0, 1, 2, 3]  # four measurements
            assert len(during) == 1  # ... and one reference read from disk for all of them
            gc.collect()
            assert during[0]() is None  # freed when the fit ended
    # The same numbers as with the reference model in memory all along.
    assert any(s["policy_logratio"] != 0.0 for s in samples["precomputed"])
    assert samples["precomputed"] == samples[None]


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("tests.test_generation_eval:wrong_length", "returned 1 values for 2 prompts"),
        ("tests.test_generation_eval:not_finite", "value 0 is nan, not a finite number"),
        ("tests.test_generation_eval:raises", "calling it on two held-out prompts of 'a' failed: KeyError"),
        ("tests.no_such_module:reward", "no module named 'tests.no_such_module'"),
    ],
)
def test_a_bad_reward_stops_the_fit_at_setup(
    tmp_path: Path, tiny_model_dir: Path, reward: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="--generation.reward") as error:
        _fit(tmp_path, tiny_model_dir, GenerationEval(reward=reward, prompts=2), lr=1e-3)
    assert message in str(error.value)
    assert not list((tmp_path / "logs").rglob("metrics.csv"))  # no training step ran


def test_unknown_set_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="generation.sets: no validation set 'c'; the run has a, b"):
        _fit(tmp_path, tiny_model_dir, GenerationEval(reward=REWARD, sets=["c"]), lr=1e-3)


class _EmptySetB(PreferenceDataModule):
    """The test's data with val set ``b`` built but left without pairs."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.val_datasets["b"] = self.val_datasets["b"].select([])


def test_a_set_without_prompts_is_one_config_error_naming_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="^data set 'b' has no kept pairs to draw prompts from$"):
        _fit(
            tmp_path,
            tiny_model_dir,
            GenerationEval(reward=REWARD, sets=["b"]),
            lr=1e-3,
            data_class=_EmptySetB,
        )
    assert not list((tmp_path / "logs").rglob("metrics.csv"))  # no training step ran
