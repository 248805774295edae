"""``python -m ipo_lightning judge RUN_DIR --reward SPEC``: a reward judges policy vs reference, greedily.

The greedy-only form of the generation evaluation (:mod:`ipo_lightning.evaluation`, the path of
``evaluate`` and of ``--generation.*`` during training): for the first ``--prompts`` distinct prompts of
the run's primary val set (the first of ``data.val``, else the ``val_fraction`` held-out set; the
prompts rebuilt from the run's whole ``data`` settings, :mod:`ipo_lightning.analysis.run_models`), the
exported policy (``RUN_DIR/hf_model``) and the reference, each loaded with the run's ``model.*``
settings, write one greedy completion per prompt, batched, on the GPU when there is one. The reward
(:func:`ipo_lightning.rewards.load_reward`: a reward model folder or hub id, ``module:function`` or
``builtin:gold``) scores both as it does in ``evaluate``. Per prompt the policy wins (1), ties (0.5) or
loses (0); the win rate is the mean outcome with the normal-approximation interval of
:func:`ipo_lightning.generation_metrics.win_rate` (one completion per prompt:
``rate +- 1.96 * sd / sqrt(n)``, sd of the outcomes), clipped to [0, 1]. The result, with every
prompt's completions and scores, is written atomically to ``RUN_DIR/judge.json``, which ``report``
shows as a column.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ipo_lightning.analysis.run_logs import load_run
from ipo_lightning.errors import ConfigError
from ipo_lightning.eval_options import DEFAULT_PROMPTS, EvalOptions
from ipo_lightning.generation_metrics import WinRate

RESULT_FILE = "judge.json"
_DEFAULTS = EvalOptions()


def judge_run(
    run_dir: Path,
    reward: str,
    *,
    prompts: int = DEFAULT_PROMPTS,
    max_new_tokens: int = _DEFAULTS.max_new_tokens,
    batch_size: int = _DEFAULTS.batch_size,
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
    # The models' packages (torch, transformers, Lightning), only here: --help and argument errors
    # come without them.
    from ipo_lightning.analysis.run_models import judge_policy_and_reference, load_run_model, run_data_module
    from ipo_lightning.data.prompts import held_out_prompts
    from ipo_lightning.evaluation import greedy_win_rate, write_atomically
    from ipo_lightning.rewards import load_reward

    if prompts < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--prompts, --max_new_tokens and --batch_size must be at least 1")
    # Every check of the run folder comes before the reward is loaded: a reward model takes long to
    # load, and a mistyped run folder should be reported at once.
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    run = load_run(run_dir)
    policy_dir = run_dir / "hf_model"
    if not policy_dir.is_dir():
        raise ConfigError(f"{run_dir}: no hf_model/ export to judge (it is written at the end of fit)")
    if not run.config:
        raise ConfigError(f"{run_dir}: no config.yaml here; judge reads the run's models and data from it")
    data = run_data_module(run)
    if not data.val_set_names:
        raise ConfigError(
            f"{run_dir}: the run has no validation set (data.val or val_fraction) to draw prompts from"
        )
    primary = data.val_set_names[0]
    held = held_out_prompts(data, primary, prompts)
    scorer = load_reward(reward, option=option, batch_size=batch_size)
    options = EvalOptions(
        samples_per_prompt=0, greedy=True, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    mine, theirs = judge_policy_and_reference(
        run,
        lambda: load_run_model(run, str(policy_dir)),
        data.tokenizer,
        {primary: held},
        scorer,
        options,
        reference_greedy=True,
    )
    policy, reference = mine[primary], theirs[primary]
    result = greedy_win_rate(policy, reference)
    samples = [
        {
            "prompt": prompt.text,
            "policy": ours.greedy.text if ours.greedy is not None else "",
            "reference": other.greedy.text if other.greedy is not None else "",
            "policy_score": ours.greedy_reward,
            "reference_score": other.greedy_reward,
        }
        for prompt, ours, other in zip(held, policy, reference, strict=True)
    ]
    record = {
        **asdict(result),
        "reward": reward,
        "val_set": primary,
        "max_new_tokens": max_new_tokens,
        "samples": samples,
    }
    write_atomically(run_dir / RESULT_FILE, json.dumps(record, indent=2) + "\n")
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
    parser.add_argument(
        "--prompts",
        type=int,
        default=DEFAULT_PROMPTS,
        help=f"distinct val prompts judged (default {DEFAULT_PROMPTS})",
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=_DEFAULTS.max_new_tokens,
        help=f"longest greedy completion (default {_DEFAULTS.max_new_tokens})",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=_DEFAULTS.batch_size,
        help=f"prompts per generation batch, texts per reward batch (default {_DEFAULTS.batch_size})",
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
