"""The model card (``README.md``) of a Hugging Face export, written from the run's own files.

Everything in the card comes from the run folder: the resolved config (``config.yaml``: model, loss and
data settings) and ``metrics.csv`` (the last held-out values), plus the number of training pairs the
data module kept. The card is a :class:`huggingface_hub.ModelCard`: YAML front matter that the hub
reads (``library_name``, ``base_model``, ``tags``, ``datasets``) and a Markdown body for people.

``base_model`` and ``datasets`` hold hub ids only: a built-in model or a local folder or file is not
something the hub can link to, so those are named in the body instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ipo_lightning.analysis.run_logs import RunMetrics
from ipo_lightning.builtin import is_builtin
from ipo_lightning.module import default_beta

CARD_FILENAME = "README.md"
CONFIG_FILENAME = "ipo_lightning_config.yaml"
"""The run's resolved config, copied into the export so the card's command reproduces the run."""
CARD_METRIC_PREFIXES = ("val/",)
CARD_EXTRA_METRICS = ("divergence/kl", "gen/reward", "gen/win_rate", "gen/kl")
"""Besides every ``val/`` metric: the drift from the reference and, when logged, generation scores."""

BUILTIN_MODELS = {
    "builtin:quickstart": "a tiny Llama (hidden size 64, 2 layers, 262K parameters) with random weights "
    "from a fixed seed and a byte-level BPE tokenizer trained on the quickstart texts, built by "
    "ipo-lightning (`ipo_lightning/builtin.py`); not a hub model",
    "builtin:gold": "the reference of ipo-lightning's gold-reward task: a tiny Llama trained by SFT on "
    "the task's demonstrations (`ipo_lightning/gold/reference.py`); not a hub model",
}

LOSS_DESCRIPTIONS = {
    "ipo": (
        "IPO (Identity Preference Optimization, Azar et al. 2023)",
        "(h - (2p - 1)/(2 beta))^2",
        "the margin h is regressed to the target (2p - 1)/(2 beta), 1/(2 beta) for a hard label (p = 1)",
    ),
    "dpo": (
        "DPO (Direct Preference Optimization, Rafailov et al. 2023)",
        "-(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h)",
        "e is the label smoothing (conservative DPO) or 1 - p for a soft label",
    ),
    "hinge": (
        "hinge loss (SLiC, Zhao et al. 2023)",
        "relu(1 - beta h)",
        "pairs with beta h >= 1 add nothing",
    ),
}
PAIR_MARGIN = (
    "h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)], with y_w the chosen and y_l "
    "the rejected completion, pi the policy and ref the frozen reference"
)
MARGIN_DEFINITION = (
    f"{PAIR_MARGIN}; p is a pair's preference probability (1 unless the data gives `preference_prob`)"
)
REWARD_MODEL_TAGS = ["reward-model", "bradley-terry"]
REWARD_MODEL_LOSS = "-q logsigmoid(r_w - r_l) - (1 - q) logsigmoid(r_l - r_w) + c (r_w + r_l)^2"
REWARD_MODEL_LOSS_NOTE = (
    "the Bradley-Terry loss, with r_w and r_l the scores of the chosen and the rejected completion, "
    "q = (1 - e) p + e (1 - p) for a pair's preference probability p (1 unless the data gives "
    "`preference_prob`) and label smoothing e, and c the reward-centring coefficient (0: off)"
)
REWARD_MODEL_METRICS_NOTE = (
    "`rm/accuracy` is the fraction of pairs whose chosen completion scores higher, `rm/margin` the mean "
    "r_w - r_l, `rm/reward_mean` and `rm/reward_std` the mean and standard deviation of all scores"
)
ON_POLICY_METHODS = ("rloo", "online")
"""The methods that train on prompts and the policy's own samples rather than on preference pairs."""
ON_POLICY_METRIC_PREFIXES = ("val/", "gen/")
"""On-policy cards: the rollout metrics on the held-out prompts and every generation score."""
RLOO_LOSS = "-mean_i A_i log pi(y_i|x), A_i = r'_i - mean_{j != i} r'_j, r'_i = r_i - beta kl_i"
RLOO_LOSS_NOTE = (
    "for the k samples y_1..y_k of a prompt x, r_i is sample i's reward and kl_i = log pi(y_i|x) - "
    "log ref(y_i|x) its sampled KL to the reference (both summed over the completion's tokens, "
    "detached in r'); the leave-one-out baseline makes the expected gradient that of "
    "E_pi[r] - beta KL(pi || ref)"
)
ON_POLICY_METRICS_NOTE = (
    "`val/...` samples the held-out prompts with a fixed seed: `val/reward` is the mean reward of the "
    "samples, `val/kl` their mean log pi(y|x) - log ref(y|x) (summed over the completion); `gen/...` "
    "are the generation evaluation's scores"
)
REFERENCE_DESCRIPTIONS = {
    "separate": "a separate frozen copy of the starting model",
    "lora": "the starting model itself (the LoRA policy with its adapters switched off)",
    "precomputed": "the starting model's log-probs, computed once before training",
}


@dataclass(frozen=True)
class CardMetric:
    """The last logged value of one metric and the step it was logged at."""

    name: str
    value: float
    step: int


def model_kind(name_or_path: str) -> str:
    """``builtin``, ``local`` (an existing folder or file) or ``hub`` (anything else: a hub id)."""
    if is_builtin(name_or_path):
        return "builtin"
    return "local" if Path(name_or_path).expanduser().exists() else "hub"


def last_metrics(run: RunMetrics, prefixes: tuple[str, ...] = CARD_METRIC_PREFIXES) -> list[CardMetric]:
    """The last value of every metric starting with one of ``prefixes`` and of
    :data:`CARD_EXTRA_METRICS`, by name."""
    names = sorted({name for row in run.rows for name in row})
    chosen = [name for name in names if name.startswith(prefixes) or name in CARD_EXTRA_METRICS]
    metrics = []
    for name in chosen:
        steps, values = run.series(name)
        if values:
            metrics.append(CardMetric(name, values[-1], steps[-1]))
    return metrics


def _format(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _source_text(source: dict[str, Any]) -> str:
    """A data source as the body names it: ``path`` plus the split and limit where they matter."""
    path = str(source.get("path"))
    details = []
    if model_kind(path) == "hub":
        details.append(f"split {source.get('split', 'train')}")
        if source.get("subset"):
            details.append(f"subset {source['subset']}")
    if source.get("limit") is not None:
        details.append(f"first {source['limit']} records")
    return f"`{path}`" + (f" ({', '.join(details)})" if details else "")


def _preference_method(model: dict[str, Any], base_text: str) -> list[str]:
    """The card's opening line and ``Training method`` bullets for a preference (IPO/DPO) run."""
    loss_type = str(model.get("loss_type", "ipo"))
    beta = float(model["beta"]) if model.get("beta") is not None else default_beta(loss_type)
    name, formula, note = LOSS_DESCRIPTIONS[loss_type]
    length_normalize = bool(model.get("length_normalize"))
    lines = [
        f"A causal language model fine-tuned on preference pairs with {name} by ipo-lightning, "
        f"starting from {base_text}.",
        "",
        "## Training method",
        "",
        f"- **Loss** (`loss_type: {loss_type}`), per pair: `{formula}`; {note}. Here {MARGIN_DEFINITION}.",
        f"- **beta**: {beta:g}"
        + (f" (target margin 1/(2 beta) = {1 / (2 * beta):g})" if loss_type == "ipo" else ""),
    ]
    if loss_type == "dpo":
        lines.append(f"- **Label smoothing** e: {float(model.get('label_smoothing', 0.0)):g}")
    lines.append(
        "- **Length normalisation**: "
        + (
            "on: log pi(y|x) is the mean over the completion's tokens (so the margin is in nats per token)"
            if length_normalize
            else "off: log pi(y|x) is the sum over the completion's tokens"
        )
    )
    reference = str(model.get("reference") or "separate")
    lines.append(
        f"- **Reference** (`reference: {reference}`): {REFERENCE_DESCRIPTIONS.get(reference, reference)}"
    )
    return lines + _lora_bullets(model)


def _lora_bullets(model: dict[str, Any]) -> list[str]:
    """The ``LoRA`` bullet of a run trained with adapters (none for full fine-tuning)."""
    lora = model.get("lora")
    if not lora:
        return []
    return [
        f"- **LoRA**: rank {lora.get('rank')}, alpha {lora.get('alpha')}, target modules "
        f"{lora.get('target_modules') or 'peft default'}; merged into the weights of this export"
    ]


def _reward_model_method(model: dict[str, Any], base_text: str) -> list[str]:
    """The card's opening line and ``Training method`` bullets for a reward model (method reward_model)."""
    lines = [
        "A reward model (sequence classification with one output: the score of a prompt + completion, read "
        f"at its last token) trained on preference pairs by ipo-lightning, starting from {base_text}.",
        "",
        "## Training method",
        "",
        f"- **Loss**, per pair: `{REWARD_MODEL_LOSS}`; {REWARD_MODEL_LOSS_NOTE}",
        f"- **Label smoothing** e: {float(model.get('label_smoothing', 0.0) or 0.0):g}",
    ]
    center = model.get("center_rewards_coefficient")
    lines.append(
        f"- **Reward centring**: {float(center):g} (c in `c (r_w + r_l)^2`)"
        if center
        else "- **Reward centring**: off"
    )
    # The score head trains in full beside the adapters; the merged export holds it.
    return lines + _lora_bullets(model)


def _on_policy_method(method: str, model: dict[str, Any], base_text: str) -> list[str]:
    """The card's opening line and ``Training method`` bullets for an on-policy run (rloo, online)."""
    reward = f"`{model.get('reward')}`"
    if method == "rloo":
        beta = float(model["beta"])
        k = int(model["samples_per_prompt"])
        lines = [
            "A causal language model fine-tuned with RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024) "
            f"by ipo-lightning, starting from {base_text}: trained on prompts, on completions it sampled "
            f"itself during training, scored by the reward {reward}.",
            "",
            "## Training method",
            "",
            f"- **Loss** (`method: rloo`), per prompt: `{RLOO_LOSS}`; {RLOO_LOSS_NOTE}.",
            f"- **beta** (weight of the KL penalty in the reward): {beta:g}",
            f"- **Samples per prompt** k: {k}",
        ]
    else:
        loss_type = str(model["loss_type"])
        beta = float(model["beta"])
        temperature = float(model.get("label_temperature") or 0.0)
        name, formula, note = LOSS_DESCRIPTIONS[loss_type]
        label = (
            f"p = sigmoid(|r_1 - r_2| / T), T = {temperature:g}"
            if temperature
            else "p = 1 (hard labels; 0.5 on a tie, `label_temperature: 0`)"
        )
        lines = [
            f"A causal language model fine-tuned with online {name} by ipo-lightning, starting from "
            f"{base_text}: trained on prompts, on pairs of completions it sampled itself during training, "
            f"labelled by the reward {reward}.",
            "",
            "## Training method",
            "",
            f"- **Pairs**: the policy samples 2 completions of each prompt; the one with the higher reward "
            f"is y_w, with preference probability {label}.",
            f"- **Loss** (`method: online`, `loss_type: {loss_type}`), per pair: `{formula}`; {note}. "
            f"Here {PAIR_MARGIN}.",
            f"- **beta**: {beta:g}"
            + (f" (target margin 1/(2 beta) = {1 / (2 * beta):g} for p = 1)" if loss_type == "ipo" else ""),
            "- **Length normalisation**: "
            + (
                "on: log pi(y|x) is the mean over the completion's tokens"
                if model.get("length_normalize")
                else "off: log pi(y|x) is the sum over the completion's tokens"
            ),
        ]
    penalty = model.get("missing_eos_penalty")
    if penalty:
        lines.append(
            f"- **Missing-EOS penalty**: {float(penalty):g} subtracted from the reward of unended samples"
        )
    lines.append(f"- **Sampling**: temperature 1, at most {model.get('max_new_tokens')} new tokens")
    reference = str(model.get("reference") or "separate")
    lines.append(
        f"- **Reference** (`reference: {reference}`): {REFERENCE_DESCRIPTIONS.get(reference, reference)}"
    )
    return lines


def build_model_card(
    run: RunMetrics, *, global_step: int, train_pairs: int | None, reproducible: bool, title: str
) -> ModelCard:
    """The card of an export trained with ``run.config`` (resolved config) that logged ``run.rows``.

    Args:
        run: the run's resolved config (``model`` and ``data`` sections) and its ``metrics.csv`` rows.
        global_step: optimizer steps the exported policy was trained for.
        train_pairs: training pairs the data module kept (after drops and the held-out split), if known.
        reproducible: the export holds the resolved config as :data:`CONFIG_FILENAME` (a CLI run), so
            the card can give the command that runs the same settings again.
        title: the card's heading (the hub repo id, or the export folder's name).
    """
    model = run.setting("model", {}) or {}
    method = str(run.setting("method") or "preference")
    reward_model = method == "reward_model"
    on_policy = method in ON_POLICY_METHODS
    data = run.setting("data", {}) or {}
    loss_type = str(model.get("loss_type", "ipo"))
    base = str(model.get("model_name_or_path"))
    kind = model_kind(base)
    train = data.get("train") or {}
    train_path = str(train.get("path")) if train else None
    datasets = [train_path] if train_path and model_kind(train_path) == "hub" else None

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-classification" if reward_model else "text-generation",
        base_model=base if kind == "hub" else None,
        datasets=datasets,
        tags=_tags(method, loss_type),
    )
    if kind == "builtin":
        base_text = f"`{base}`: {BUILTIN_MODELS.get(base, 'a model built by ipo-lightning')}"
    elif kind == "local":
        base_text = f"a local model folder, `{base}` (not a hub model)"
    else:
        base_text = f"[`{base}`](https://huggingface.co/{base})"
    lines = [f"# {title}", ""]
    if reward_model:
        lines += _reward_model_method(model, base_text)
    elif on_policy:
        lines += _on_policy_method(method, model, base_text)
    else:
        lines += _preference_method(model, base_text)
    lines.append(f"- **Optimizer steps**: {global_step}")

    lines += ["", "## Data", ""]
    if train_path:
        unit = "distinct training prompts" if on_policy else "training pairs"
        pairs = f": {train_pairs} {unit}" if train_pairs is not None else ""
        lines.append(f"- **Training set** {_source_text(train)}{pairs}")
    if not on_policy:  # prompts have no labels to flip
        noise = float(data.get("label_noise", 0.0) or 0.0)
        lines.append(
            f"- **Label noise**: {noise:g}"
            + (
                " (this fraction of training pairs had chosen and rejected swapped on purpose)"
                if noise
                else " (none)"
            )
        )
    for set_name, source in (data.get("val") or {}).items():
        lines.append(f"- **Validation set** `{set_name}`: {_source_text(source)}")
    if data.get("val_fraction"):
        lines.append(f"- **Validation set** `held_out`: {data['val_fraction']:g} of the training records")

    metrics = last_metrics(run, ON_POLICY_METRIC_PREFIXES if on_policy else CARD_METRIC_PREFIXES)
    if reward_model:
        metrics_note = f"`val/...` on the held-out sets: {REWARD_MODEL_METRICS_NOTE}"
    elif on_policy:
        metrics_note = ON_POLICY_METRICS_NOTE
    else:
        metrics_note = (
            "`val/...` on the held-out sets, `divergence/kl` is KL(policy || reference) per completion "
            "token on held-out pairs"
        )
    lines += ["", "## Results", ""]
    if metrics:
        lines += [
            f"Last logged values (`metrics.csv` of the run; {metrics_note}):",
            "",
            "| metric | value | step |",
            "| --- | ---: | ---: |",
        ]
        lines += [f"| `{metric.name}` | {_format(metric.value)} | {metric.step} |" for metric in metrics]
    else:
        lines.append("No held-out metrics were logged.")

    lines += ["", "## Reproduce", ""]
    if reproducible:
        lines += [
            f"`{CONFIG_FILENAME}` in this folder is the run's resolved config (every option, defaults "
            "filled in; local data paths in it must exist where you run it). The same settings run with:",
            "",
            "```bash",
            f"python -m ipo_lightning fit --config {CONFIG_FILENAME}",
            "```",
        ]
    else:
        lines.append(
            "Trained through the Python API (`Trainer.fit`), not the command line: no config to rerun."
        )
    lines += ["", "## Use", ""]
    if reward_model:
        lines += REWARD_MODEL_USE
    else:
        lines += [*CAUSAL_LM_USE, "", ON_POLICY_INFO if on_policy else PREFERENCE_INFO]
    # Built as text rather than from a jinja template: the body's braces and pipes stay literal.
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _tags(method: str, loss_type: str) -> list[str]:
    """The hub tags of an export of ``method``."""
    if method == "reward_model":
        return ["ipo-lightning", *REWARD_MODEL_TAGS]
    if method == "rloo":
        return ["ipo-lightning", "rloo", "rlhf"]
    if method == "online":
        return ["ipo-lightning", f"online-{loss_type}", "rlhf"]
    return ["ipo-lightning", loss_type, "preference-optimization"]


CAUSAL_LM_USE = [
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "",
    'model = AutoModelForCausalLM.from_pretrained("<this folder or repo id>")',
    'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo id>")',
    "```",
]
PREFERENCE_INFO = (
    "`ipo_lightning.json` states the method, loss, beta, length normalisation and step of this export."
)
ON_POLICY_INFO = (
    "`ipo_lightning.json` states the method, reward, samples per prompt, beta (and for online the loss "
    "type, label temperature and length normalisation) and step of this export."
)
REWARD_MODEL_USE = [
    "```python",
    "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
    "",
    'model = AutoModelForSequenceClassification.from_pretrained("<this folder or repo id>")',
    'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo id>")',
    'score = model(**tokenizer(prompt + completion, return_tensors="pt")).logits[0, 0]',
    "```",
    "",
    "As a reward in ipo-lightning: `--generation.reward <this folder>` (or "
    '`ipo_lightning.rewards.load_reward("<this folder>", option=...)`). `ipo_lightning.json` states the '
    "loss settings and step of this export.",
]
