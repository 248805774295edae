"""A finished run's data and models, rebuilt from its ``config.yaml`` for the commands that judge it.

``evaluate`` and ``judge`` must see what the run saw: the held-out prompts of its data module (the
same ``val_fraction`` split, ``train_size``, ``seed``, lengths and format) and its models in the run's
``model.dtype`` (the reference in ``model.reference_dtype`` when set), attention implementation and
``trust_remote_code``, loaded by :func:`ipo_lightning.modeling.load_causal_lm` as training loads them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ipo_lightning.analysis.run_logs import RunMetrics
from ipo_lightning.batching import single_row_layout
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.prompts import HeldOutPrompt
from ipo_lightning.errors import ConfigError
from ipo_lightning.evaluation import (
    EvalOptions,
    PromptResult,
    judge_prompts,
    sample_logprobs,
    with_log_ratios,
)
from ipo_lightning.modeling import load_causal_lm
from ipo_lightning.module import PreferenceModule
from ipo_lightning.rewards import RewardFunction

_SOURCES = ("train", "val", "test")


def run_data_module(run: RunMetrics) -> PreferenceDataModule:
    """The run's data module from the whole saved ``data:`` section, with its train and val sets built.

    The tokenizer and ``trust_remote_code`` are the model's (``fit`` links them); test sets are left
    out (nothing here draws prompts from them). The training set is built whenever the run has one: the
    ``val_fraction`` held-out set is carved from it, and a run without val sets draws prompts from it.

    Raises:
        ConfigError: the config has no ``data`` section with a train or val set, or a ``data`` key this
            version's data module does not take (named with the config file).
    """
    where = f"{run.run_dir}/config.yaml"
    data = dict(run.setting("data") or {})
    if not data.get("val") and not data.get("train"):
        raise ConfigError(f"{where}: data has neither val sets nor a train set to draw prompts from")
    accepted = set(inspect.signature(PreferenceDataModule.__init__).parameters) - {"self"}
    for key in data:
        if key not in accepted:
            raise ConfigError(f"{where}: data.{key} is not a setting of the data module")
    train = data.get("train")
    settings: dict[str, Any] = {
        **data,
        "train": DataSource(**train) if train else None,
        "val": {name: DataSource(**source) for name, source in (data.get("val") or {}).items()},
        "test": None,
        "tokenizer_name_or_path": run.setting("model.model_name_or_path"),
        "trust_remote_code": bool(run.setting("model.trust_remote_code", False)),
    }
    module = PreferenceDataModule(**settings)
    module.setup("fit" if module.train is not None else "validate")
    return module


def _model_default(name: str) -> Any:
    return inspect.signature(PreferenceModule.__init__).parameters[name].default


def load_run_model(run: RunMetrics, name_or_path: str, *, reference: bool = False) -> torch.nn.Module:
    """A causal LM loaded with the run's model settings (the policy's, or with ``reference`` the
    reference's dtype: ``model.reference_dtype``, else ``model.dtype``), in eval mode, on the CPU."""
    dtype = run.setting("model.dtype") or _model_default("dtype")
    if reference:
        dtype = run.setting("model.reference_dtype") or dtype
    return load_causal_lm(
        name_or_path,
        dtype=dtype,
        attn_implementation=run.setting("model.attn_implementation", _model_default("attn_implementation")),
        trust_remote_code=bool(run.setting("model.trust_remote_code", False)),
    )


def reference_path(run: RunMetrics) -> str:
    """The run's reference model: ``model.reference_name_or_path``, else the base model."""
    return run.setting("model.reference_name_or_path") or run.setting("model.model_name_or_path")


def judge_policy_and_reference(
    run: RunMetrics,
    policy: Callable[[], torch.nn.Module],
    tokenizer: Any,
    held_out: dict[str, Sequence[HeldOutPrompt]],
    reward: RewardFunction,
    options: EvalOptions,
    *,
    reference_greedy: bool,
) -> tuple[dict[str, list[PromptResult]], dict[str, list[PromptResult]]]:
    """The policy's and the reference's judged completions of every set, one model in memory at a time;
    the policy's samples carry their log-ratios to the reference (``gen/kl``).

    Args:
        policy: loads the policy (on the CPU); judged first, its samples scored, then freed.
        reference_greedy: also the reference's greedy completions (the policy's follow ``options``).

    Returns:
        ``(policy, reference)``: set name -> results in prompt order.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scoring = {"batching": single_row_layout(run.setting("model.batching")), "batch_size": options.batch_size}
    model = policy().to(device)
    mine = {
        name: judge_prompts(model, tokenizer, items, range(len(items)), reward, options)
        for name, items in held_out.items()
    }
    policy_logps = {name: sample_logprobs(model, held_out[name], mine[name], **scoring) for name in held_out}
    del model
    reference = load_run_model(run, reference_path(run), reference=True).to(device)
    theirs = {
        name: judge_prompts(
            reference, tokenizer, items, range(len(items)), reward, options, greedy=reference_greedy
        )
        for name, items in held_out.items()
    }
    for name in held_out:
        reference_logps = sample_logprobs(reference, held_out[name], mine[name], **scoring)
        mine[name] = with_log_ratios(mine[name], policy_logps[name], reference_logps)
    return mine, theirs
