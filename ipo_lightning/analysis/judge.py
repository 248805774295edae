"""``python -m ipo_lightning judge RUN_DIR --reward_model PATH``: a reward model judges policy vs reference.

For the first ``--prompts`` prompts of the run's primary val set, the exported policy
(``RUN_DIR/hf_model``) and the reference each write a greedy completion; a Hugging Face
sequence-classification model scores ``prompt + completion`` for both. Per prompt the policy wins
(1), ties (0.5) or loses (0); the win rate is the mean outcome, with a normal-approximation
confidence interval ``rate +- z * sd / sqrt(n)`` (sd of the outcomes), clipped to [0, 1]. The result
goes to ``RUN_DIR/judge.json``, which ``report`` shows as a column.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from ipo_lightning.analysis.run_logs import load_run
from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.errors import ConfigError
from ipo_lightning.modeling import load_causal_lm

Z_95 = 1.959963984540054


@dataclass
class WinRate:
    """How often the policy's completion out-scores the reference's, with a confidence interval."""

    win_rate: float
    ci_low: float
    ci_high: float
    prompts: int
    wins: int
    ties: int
    losses: int


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float], z: float = Z_95) -> WinRate:
    """Win rate of ``policy_scores`` over ``reference_scores`` (paired per prompt), ties counting half."""
    if len(policy_scores) != len(reference_scores) or not policy_scores:
        raise ValueError("need the same, non-zero number of policy and reference scores")
    pairs = zip(policy_scores, reference_scores, strict=True)
    outcomes = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in pairs]
    rate = statistics.fmean(outcomes)
    spread = statistics.stdev(outcomes) if len(outcomes) > 1 else 0.0
    half_width = z * spread / math.sqrt(len(outcomes))
    return WinRate(
        win_rate=rate,
        ci_low=max(0.0, rate - half_width),
        ci_high=min(1.0, rate + half_width),
        prompts=len(outcomes),
        wins=outcomes.count(1.0),
        ties=outcomes.count(0.5),
        losses=outcomes.count(0.0),
    )


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy completion text of every prompt (one at a time: no padding, nothing to get wrong)."""
    texts = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=next(model.parameters()).device)
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts.append(tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True))
    return texts


@torch.no_grad()
def reward_scores(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> list[float]:
    """The reward model's first logit for each text (scored one at a time)."""
    scores = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", truncation=True)
        scores.append(float(model(**encoded).logits[0, 0]))
    return scores


def load_reward_model(name_or_path: str) -> torch.nn.Module:
    """The sequence-classification reward model, in eval mode, from safetensors weights only.

    Pickled ``.bin`` weights can run code when loaded, so they are refused, as for every model here.

    Raises:
        ConfigError: the model cannot be loaded; a local folder with only ``.bin`` weights says so.
    """
    path = resolve_model_path(name_or_path)
    folder = Path(path).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ConfigError(
            f"--reward_model {name_or_path!r}: the folder holds only pickled .bin weights; the reward model "
            "is loaded from safetensors only (re-save it with save_pretrained, which writes .safetensors)"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"--reward_model {name_or_path!r}: cannot load it: {reason[:300]}") from None
    return model.eval()


def judge_run(run_dir: Path, reward_model: str, *, prompts: int = 64, max_new_tokens: int = 64) -> WinRate:
    """Judge the exported policy of ``run_dir`` against its reference; write ``judge.json``."""
    run = load_run(run_dir)
    policy_dir = run_dir / "hf_model"
    if not policy_dir.is_dir():
        raise ConfigError(f"{run_dir}: no hf_model/ export to judge (it is written at the end of fit)")
    model_path = run.setting("model.model_name_or_path")
    reference_path = run.setting("model.reference_name_or_path") or model_path
    val = run.setting("data.val") or {}
    if not val:
        raise ConfigError(f"{run_dir}: the run has no named data.val set to draw prompts from")
    primary = next(iter(val))
    data = PreferenceDataModule(
        val={primary: DataSource(**val[primary])},
        tokenizer_name_or_path=model_path,
        max_length=run.setting("data.max_length", 512),
        max_prompt_length=run.setting("data.max_prompt_length", 256),
    )
    data.setup("validate")
    prompt_ids = [list(ids) for ids in data.val_datasets[primary]["prompt_ids"][:prompts]]
    prompt_texts = [data.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_ids]

    scorer = load_reward_model(reward_model)
    scorer_tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(reward_model))
    scores = {}
    for name, path in (("policy", str(policy_dir)), ("reference", reference_path)):
        model = load_causal_lm(path)
        completions = greedy_completions(model, data.tokenizer, prompt_ids, max_new_tokens)
        texts = [prompt + completion for prompt, completion in zip(prompt_texts, completions, strict=True)]
        scores[name] = reward_scores(scorer, scorer_tokenizer, texts)
        del model
    result = win_rate(scores["policy"], scores["reference"])
    record = {
        **asdict(result),
        "reward_model": reward_model,
        "val_set": primary,
        "max_new_tokens": max_new_tokens,
    }
    (run_dir / "judge.json").write_text(json.dumps(record, indent=2) + "\n")
    return result


def main(args: list[str] | None = None) -> None:
    """``python -m ipo_lightning judge RUN_DIR --reward_model PATH [--prompts N] [--max_new_tokens N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ipo_lightning judge",
        description="Reward-model win rate of a run's exported policy against its reference.",
    )
    parser.add_argument("run_dir", type=Path, help="run folder with hf_model/ (runs/<name>/version_N)")
    parser.add_argument(
        "--reward_model", required=True, help="sequence-classification model: hub id or folder"
    )
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts judged (default 64)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="longest greedy completion")
    options = parser.parse_args(args)
    result = judge_run(
        options.run_dir, options.reward_model, prompts=options.prompts, max_new_tokens=options.max_new_tokens
    )
    print(
        f"win rate {result.win_rate:.3f} (95% CI {result.ci_low:.3f}-{result.ci_high:.3f}) over "
        f"{result.prompts} prompts: {result.wins} wins, {result.ties} ties, {result.losses} losses"
    )
