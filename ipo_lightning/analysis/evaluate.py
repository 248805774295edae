"""``python -m ipo_lightning evaluate RUN_DIR``: the generation evaluation of a finished run's policy.

Loads the exported policy (``RUN_DIR/hf_model``, or ``--model`` a model folder, or ``--checkpoint``
the policy of a Lightning checkpoint of a full-weight run) and the run's reference with the run's
``model.*`` settings, rebuilds its held-out sets from the whole ``data`` section of
``RUN_DIR/config.yaml`` (:mod:`ipo_lightning.analysis.run_models`), and judges the policy's samples
with the reward exactly as the ``--generation.*`` evaluation does during training
(:mod:`ipo_lightning.evaluation`, the same prompts, metrics and seeds). Options not given default to
the run's ``generation.*`` settings. Writes ``RUN_DIR/generation_eval.json`` (metrics per set,
options, models) and ``RUN_DIR/generation_eval_samples.jsonl`` (rows as in
``generation_samples.jsonl``), each atomically, and prints a short table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipo_lightning.analysis.run_logs import RunMetrics, load_run
from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.errors import ConfigError, UserInputError
from ipo_lightning.eval_options import DEFAULT_PROMPTS, EvalOptions

if TYPE_CHECKING:
    import torch

    from ipo_lightning.evaluation import SetResult

RESULT_FILE = "generation_eval.json"
SAMPLES_FILE = "generation_eval_samples.jsonl"
SHOWN = (
    "reward", "reference_reward", "win_rate", "greedy_reward", "kl", "length", "eos_rate", "distinct_2",
)  # fmt: skip


def _policy_from_checkpoint(checkpoint: Path, run: RunMetrics) -> torch.nn.Module:
    """The policy weights of a Lightning checkpoint of the run, in the run's model architecture."""
    import torch

    from ipo_lightning.analysis.run_models import load_run_model
    from ipo_lightning.cli_checks import check_checkpoint_file

    if run.setting("model.lora"):
        raise ConfigError(
            f"--checkpoint {checkpoint}: a LoRA run's checkpoint; evaluate its hf_model/ export"
        )
    check_checkpoint_file(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    weights = {
        key.removeprefix("policy."): value for key, value in state.items() if key.startswith("policy.")
    }
    model = load_run_model(run, run.setting("model.model_name_or_path"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied output embeddings are saved once; anything else missing means another architecture.
    missing = [key for key in missing if key not in (getattr(model, "_tied_weights_keys", None) or {})]
    if missing or unexpected:
        name = run.setting("model.model_name_or_path")
        raise ConfigError(
            f"--checkpoint {checkpoint}: its policy weights do not fit {name!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    return model


def evaluate_run(
    run_dir: Path,
    *,
    model: str | None = None,
    checkpoint: Path | None = None,
    reward: str | None = None,
    prompts: int | None = None,
    k: int | None = None,
    greedy: bool | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    """Judge the run's policy (``model``, ``checkpoint``, else the export) against its reference; write
    and return the result record.

    Every ``None`` argument takes the run's ``generation.*`` value, else the callback's default.

    Raises:
        UserInputError: no run folder, no config, no export, no reward, an unknown set, a bad reward.
    """
    # The models' packages (torch, transformers, Lightning), only here: --help and argument errors
    # come without them.
    from ipo_lightning.analysis.run_models import (
        judge_policy_and_reference,
        load_run_model,
        reference_path,
        run_data_module,
    )
    from ipo_lightning.data.prompts import held_out_prompts
    from ipo_lightning.evaluation import metric_names, set_result, write_atomically
    from ipo_lightning.rewards import load_reward

    run = load_run(run_dir)
    if not run.config:
        raise ConfigError(f"{run_dir}: no config.yaml here; evaluate reads the run's models and data from it")
    own = run.setting("generation") or {}
    defaults = EvalOptions()

    def pick(value: Any, name: str, default: Any) -> Any:
        return value if value is not None else own.get(name) if own.get(name) is not None else default

    reward_spec = pick(reward, "reward", None)
    if reward_spec is None:
        raise ConfigError(f"{run_dir}: the run sets no generation.reward; pass --reward SPEC")
    options = EvalOptions(
        samples_per_prompt=pick(k, "samples_per_prompt", defaults.samples_per_prompt),
        greedy=pick(greedy, "greedy", defaults.greedy),
        max_new_tokens=pick(max_new_tokens, "max_new_tokens", defaults.max_new_tokens),
        batch_size=pick(batch_size, "batch_size", defaults.batch_size),
        seed=pick(seed, "seed", defaults.seed),
    )
    count = pick(prompts, "prompts", DEFAULT_PROMPTS)
    if count < 1 or options.samples_per_prompt < 1 or options.max_new_tokens < 1 or options.batch_size < 1:
        raise ConfigError("--prompts, --k, --max_new_tokens and --batch_size must be at least 1")
    policy_path = str(checkpoint) if checkpoint else model or str(run_dir / "hf_model")
    if checkpoint is None and not Path(resolve_model_path(policy_path)).is_dir():
        raise ConfigError(
            f"{policy_path}: no such model folder (hf_model/ is written at the end of fit; or pass --model)"
        )
    data = run_data_module(run)
    names = list(data.val_set_names) or ["train"]
    chosen = sets or own.get("sets") or names
    for name in chosen:
        if name not in names:
            raise ConfigError(f"--sets: no set {name!r} in the run; it has {', '.join(names)}")
    scorer = load_reward(reward_spec, option="--reward" if reward is not None else "generation.reward")
    held_out = {name: held_out_prompts(data, name, count) for name in chosen}
    step = max((int(row["step"]) for row in run.rows if row.get("step")), default=0)

    def policy() -> torch.nn.Module:
        if checkpoint is not None:
            return _policy_from_checkpoint(checkpoint, run)
        return load_run_model(run, policy_path)

    mine, theirs = judge_policy_and_reference(
        run, policy, data.tokenizer, held_out, scorer, options, reference_greedy=False
    )
    results: dict[str, SetResult] = {
        name: set_result(name, step, mine[name], theirs[name]) for name in held_out
    }
    record = {
        "policy": policy_path,
        "reference": reference_path(run),
        "reward": reward_spec,
        "prompts": count,
        "options": options.__dict__,
        "step": step,
        "sets": {name: result.metrics for name, result in results.items()},
        "metrics": metric_names(results),
    }
    rows = [row for result in results.values() for row in result.rows]
    write_atomically(
        run_dir / SAMPLES_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )
    write_atomically(run_dir / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    return record


def table(record: dict[str, Any]) -> str:
    """The per-set metrics as a small fixed-width table."""
    lines = [f"{'set':<12}" + "".join(f"{name:>17}" for name in SHOWN)]
    for name, metrics in record["sets"].items():
        cells = "".join(f"{metrics[m]:>17.3f}" if m in metrics else f"{'-':>17}" for m in SHOWN)
        lines.append(f"{name:<12}{cells}")
        lines.append(
            f"{'':<12}win rate 95% CI [{metrics['win_rate_ci_low']:.3f}, {metrics['win_rate_ci_high']:.3f}]"
        )
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """``python -m ipo_lightning evaluate RUN_DIR [--reward SPEC] [--prompts N] [--k N] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m ipo_lightning evaluate",
        description="Reward of a finished run's policy samples and its win rate over the reference's.",
    )
    parser.add_argument("run_dir", type=Path, help="a fit run folder (runs/<name>/version_N)")
    parser.add_argument("--model", help="judge this model folder instead of RUN_DIR/hf_model")
    parser.add_argument(
        "--checkpoint", type=Path, help="judge the policy of this Lightning checkpoint of the run"
    )
    parser.add_argument("--reward", help="reward spec (default: the run's generation.reward)")
    defaults = EvalOptions()
    parser.add_argument(
        "--prompts", type=int, help=f"held-out prompts per set (default: the run's, else {DEFAULT_PROMPTS})"
    )
    parser.add_argument(
        "--k", type=int, help=f"samples per prompt (default: the run's, else {defaults.samples_per_prompt})"
    )
    parser.add_argument(
        "--greedy", action=argparse.BooleanOptionalAction, default=None, help="also a greedy completion"
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        help=f"longest completion (default: the run's, else {defaults.max_new_tokens})",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        help=f"rows per generate call (default: the run's, else {defaults.batch_size})",
    )
    parser.add_argument("--seed", type=int, help=f"sampling seed (default: the run's, else {defaults.seed})")
    parser.add_argument("--sets", nargs="+", help="held-out sets (default: the run's, else all val sets)")
    options = parser.parse_args(args)
    if not options.run_dir.is_dir():
        raise UserInputError(f"{options.run_dir}: no such run folder")
    record = evaluate_run(
        options.run_dir,
        model=options.model,
        checkpoint=options.checkpoint,
        reward=options.reward,
        prompts=options.prompts,
        k=options.k,
        greedy=options.greedy,
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        seed=options.seed,
        sets=options.sets,
    )
    k = record["options"]["samples_per_prompt"]
    print(f"{record['reward']}: {k} samples x {record['prompts']} prompts per set, policy {record['policy']}")
    print(table(record))
    print(f"wrote {options.run_dir / RESULT_FILE} and {SAMPLES_FILE}")
