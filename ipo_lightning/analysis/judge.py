"""``python -m ipo_lightning judge RUN_DIR --reward SPEC``: a reward judges policy vs reference.

For the first ``--prompts`` distinct prompts of the run's primary val set
(:func:`ipo_lightning.data.prompts.held_out_prompts`: the prompt token ids training uses), the exported
policy (``RUN_DIR/hf_model``) and the reference each write a greedy completion, batched, on the GPU when
there is one. The reward (:func:`ipo_lightning.rewards.load_reward`: a reward model folder or hub id,
``module:function`` or ``builtin:gold``) scores both: a chat reward model reads the prompt messages plus
the completion through its own chat template, otherwise the reward reads the prompt text (for chat data
the policy template's rendering) and the completion. Per prompt the policy wins (1), ties (0.5) or loses
(0); the win rate is the mean outcome, with a normal-approximation confidence interval
(:func:`ipo_lightning.generation_metrics.win_rate`; one completion per prompt, so
``rate +- 1.96 * sd / sqrt(n)`` with the sd of the outcomes), clipped to [0, 1]. The result, with
every prompt's completions and scores, goes to ``RUN_DIR/judge.json``, which ``report`` shows as a column.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ipo_lightning.analysis.run_logs import load_run
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.prompts import held_out_prompts
from ipo_lightning.errors import ConfigError
from ipo_lightning.generation import generate_completions
from ipo_lightning.generation_metrics import WinRate, win_rate
from ipo_lightning.modeling import load_causal_lm
from ipo_lightning.rewards import load_reward


def judge_run(
    run_dir: Path,
    reward: str,
    *,
    prompts: int = 64,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    option: str = "--reward",
) -> WinRate:
    """Judge the exported policy of ``run_dir`` against its reference with ``reward``; write ``judge.json``.

    Args:
        run_dir: A run folder with ``hf_model/`` and ``config.yaml``.
        reward: A reward spec (:func:`ipo_lightning.rewards.load_reward`): a sequence-classification
            model's folder or hub id, ``module:function``, or ``builtin:gold``.
        prompts: Distinct prompts of the primary val set judged (fewer if the set has fewer).
        max_new_tokens: Longest greedy completion.
        batch_size: Prompts per generation batch and texts per reward-model batch.
        option: How errors name the reward option.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge = load_reward(reward, option=option, device=device, batch_size=batch_size)
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
        format=run.setting("data.format", "auto"),
        columns=run.setting("data.columns"),
        max_length=run.setting("data.max_length", 512),
        max_prompt_length=run.setting("data.max_prompt_length", 256),
    )
    data.setup("validate")
    assert data.tokenizer is not None
    held = held_out_prompts(data, primary, prompts)
    texts = [prompt.text for prompt in held]
    # Chat prompts go to the reward as messages too, so a chat reward model reads its own template.
    chat = all(prompt.messages is not None for prompt in held)
    conversations = [prompt.messages or [] for prompt in held] if chat else None

    completions: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    for name, path in (("policy", str(policy_dir)), ("reference", reference_path)):
        model = load_causal_lm(path).to(device)
        rows = generate_completions(
            model,
            data.tokenizer,
            [prompt.ids for prompt in held],
            greedy=True,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        completions[name] = [row[0].text for row in rows]
        scores[name] = judge(texts, completions[name], conversations=conversations)
        del model
    result = win_rate(scores["policy"], scores["reference"])
    samples = [
        {
            "prompt": text,
            "policy": policy,
            "reference": reference,
            "policy_score": policy_score,
            "reference_score": reference_score,
        }
        for text, policy, reference, policy_score, reference_score in zip(
            texts,
            completions["policy"],
            completions["reference"],
            scores["policy"],
            scores["reference"],
            strict=True,
        )
    ]
    record = {
        **asdict(result),
        "reward": reward,
        "val_set": primary,
        "max_new_tokens": max_new_tokens,
        "samples": samples,
    }
    (run_dir / "judge.json").write_text(json.dumps(record, indent=2) + "\n")
    return result


def main(args: list[str] | None = None) -> None:
    """``python -m ipo_lightning judge RUN_DIR --reward SPEC [--prompts N] [--max_new_tokens N] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m ipo_lightning judge",
        description="Win rate of a run's exported policy against its reference, judged by a reward.",
    )
    parser.add_argument("run_dir", type=Path, help="run folder with hf_model/ (runs/<name>/version_N)")
    parser.add_argument(
        "--reward",
        "--reward_model",
        dest="reward",
        required=True,
        help="the judge: a sequence-classification reward model (folder or hub id, safetensors), "
        "module:function (a callable (prompts, completions) -> scores), or builtin:gold",
    )
    parser.add_argument("--prompts", type=int, default=64, help="distinct val prompts judged (default 64)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="longest greedy completion")
    parser.add_argument(
        "--batch_size", type=int, default=32, help="prompts per generation batch, texts per reward batch"
    )
    options = parser.parse_args(args)
    result = judge_run(
        options.run_dir,
        options.reward,
        prompts=options.prompts,
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
    )
    print(
        f"win rate {result.win_rate:.3f} (95% CI {result.ci_low:.3f}-{result.ci_high:.3f}) over "
        f"{result.prompts} prompts: {result.wins} wins, {result.ties} ties, {result.losses} losses"
    )
