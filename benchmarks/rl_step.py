"""Optimizer-step cost of the on-policy methods (RLOO, online IPO) against an offline IPO step.

Each method trains the same model (default ``builtin:gold``, the gold task's reference) on the same
prompts (default ``builtin:gold/train``: the offline step reads its pairs, the on-policy steps its
distinct prompts), each step on the same number of completions, through its real Lightning module,
``training_step`` and optimizer (the modules' default AdamW, fused where supported) in a plain
``lightning.Trainer`` (no logger, checkpoint or validation):

- ``ipo``: :class:`~ipo_lightning.module.PreferenceModule` (IPO, beta 0.5), B pairs per step, which
  scores 2B fixed completions;
- ``rloo``: :class:`~ipo_lightning.rl.rloo.RLOOModule` (beta 0.05), 2B/k prompts x k samples;
- ``online_ipo``: :class:`~ipo_lightning.rl.online.OnlineModule` (IPO, beta 0.5), B prompts x 2.

``--model`` is any model folder or hub id, ``--data`` any preference set (the on-policy methods use
its distinct prompts). The on-policy modules score their samples with ``--reward`` (default the gold
reward) and sample up to ``--max_new_tokens`` per completion, every row of a step in one ``generate``
call by default (``--generation_batch_size``). Every module keeps its default ``model.batching:
auto`` (for sdpa: prefix_shared pairs offline, padding_free sampled rows on-policy).

A step is timed from Lightning's ``on_train_batch_start`` to ``on_train_batch_end`` (data loading
excluded); hooks split it into ``forward`` (``training_step``), ``backward`` and ``optimizer`` (the
rest: the optimizer and schedule step and the module's metric logging). Inside an on-policy
``training_step`` the benchmark times, from outside the product code, the three calls the rollout
makes: ``generate_completions`` (sampling), the reward function and ``score_rows`` (policy and
reference forward over the sampled rows), by wrapping the names the rollout looks them up under for
the duration of the run. ``scoring`` is ``score_rows`` for the on-policy methods and the whole
``training_step`` (policy and reference forward, loss) for the offline one. On CUDA every mark
synchronises first.

A run is ``--repeats`` rounds, each training every method once from a fresh module and Trainer (the
order rotating from round to round), ``--warmup`` steps then ``--steps`` timed ones. Printed: one JSON
line per method (medians over the timed steps of every round; each phase's share of their summed
step time; ``step_cpu_s``, the process CPU seconds of a step, which load from other processes changes
less than wall time; ``*_vs_ipo``, the median over rounds of the ratio to the same round's offline
step), then a Markdown table of the same::

    OMP_NUM_THREADS=1 python benchmarks/rl_step.py                      # gold model, 32 pairs / 64 samples
    python benchmarks/rl_step.py --model path/to/model --pairs 16 --k 2
    python benchmarks/rl_step.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import lightning as L
import torch

import ipo_lightning.rl.module as on_policy
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.generation import Completion
from ipo_lightning.modeling import DType
from ipo_lightning.module import PreferenceModule
from ipo_lightning.rl.data import PROMPT_IDS, PromptDataModule
from ipo_lightning.rl.online import OnlineModule
from ipo_lightning.rl.rloo import RLOOModule

METHODS = ("ipo", "rloo", "online_ipo")
"""The methods, the offline baseline first."""
BASELINE = "ipo"
PHASES = ("forward", "backward", "optimizer", "generate", "reward", "scoring")
"""Per-step timings; the last three are measured inside an on-policy ``training_step``."""


@dataclass(frozen=True)
class Setup:
    """What every method trains on (each a command-line flag)."""

    model: str = "builtin:gold"
    data: str = "builtin:gold/train"
    reward: str = "ipo_lightning.gold:gold_reward"
    pairs: int = 32
    """B: pairs per offline step; every step trains on 2B completions."""
    k: int = 4
    """RLOO's samples per prompt (it must divide 2B)."""
    max_new_tokens: int = 80
    generation_batch_size: int = 256
    max_length: int = 128
    max_prompt_length: int = 32
    warmup: int = 2
    steps: int = 6
    repeats: int = 3
    """Rounds, each measuring every method once (its order rotating), from a fresh module and Trainer."""
    device: str = "cpu"
    dtype: str = "float32"
    precision: str = "32-true"
    seed: int = 0
    cache_dir: str | None = None
    """datasets cache of the tokenised sets; None: datasets' default."""

    @property
    def completions(self) -> int:
        """Completions every step trains on: 2B."""
        return 2 * self.pairs


def check_setup(setup: Setup) -> None:
    """Raise ValueError, naming the flag, for a setup that cannot give equal steps."""
    if min(setup.pairs, setup.steps, setup.repeats) < 1 or setup.k < 2 or setup.warmup < 0:
        raise ValueError("--pairs, --steps and --repeats must be >= 1, --k >= 2 and --warmup >= 0")
    if setup.completions % setup.k:
        raise ValueError(f"--k {setup.k} must divide 2 x --pairs ({setup.completions}) for equal steps")
    if setup.dtype not in get_args(DType):
        raise ValueError(f"--dtype must be one of {', '.join(get_args(DType))}, got {setup.dtype!r}")
    if setup.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: torch finds no CUDA device here (torch.cuda.is_available() is False)"
        )
    if setup.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {setup.device!r}")


# ------------------------------------------------------------------------------------ the clock


@dataclass
class StepRecord:
    """One optimizer step: its completions and the seconds of each phase."""

    completions: int
    tokens: int = 0
    """Completion tokens trained on (EOS included where there is one)."""
    step: float = 0.0
    cpu: float = 0.0
    """Process CPU seconds of the step (every thread): what load from other processes changes least."""
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


class PhaseClock(L.Callback):
    """Times every training batch and its phases (module docstring) into :attr:`records`."""

    def __init__(self, device: str, samples_per_prompt: int | None) -> None:
        self.cuda = device == "cuda"
        self.samples_per_prompt = samples_per_prompt
        """k of an on-policy module (completions = prompts x k); None: pairs (2 rows each)."""
        self.records: list[StepRecord] = []
        self._marks: dict[str, float] = {}

    def now(self) -> float:
        """Wall time after the device's queued work has finished."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase`` of the running step (calls outside a step are not counted)."""
        if self.records and "start" in self._marks:
            self.records[-1].phases[phase] += seconds

    def timed(
        self, phase: str, function: Callable[..., Any], tokens: Callable[[Any], int] | None = None
    ) -> Callable[..., Any]:
        """``function`` with its calls' wall time added to ``phase`` (and ``tokens(result)`` to the
        running step's tokens)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                result = function(*args, **kwargs)
            finally:
                self.add(phase, self.now() - start)
            if tokens is not None and self.records and "start" in self._marks:
                self.records[-1].tokens += tokens(result)
            return result

        return wrapper

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The reward is loaded by the module's setup, which has run by now.
        if self.samples_per_prompt is not None:
            pl_module.reward_function = self.timed("reward", pl_module.reward_function)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *_: Any
    ) -> None:
        if self.samples_per_prompt is None:
            completions = int(batch["input_ids"].shape[0])  # chosen and rejected rows
        else:
            completions = len(batch[PROMPT_IDS]) * self.samples_per_prompt
        # Offline: the pairs' completion tokens; on-policy: counted from the samples (timed_rollout_calls).
        tokens = int(batch["completion_mask"].sum()) if self.samples_per_prompt is None else 0
        self.records.append(StepRecord(completions, tokens))
        self._marks = {"start": self.now(), "cpu": time.process_time()}

    def on_before_backward(self, *_: Any) -> None:
        self._marks["backward"] = self.now()

    def on_after_backward(self, *_: Any) -> None:
        self._marks["optimizer"] = self.now()

    def on_train_batch_end(self, *_: Any) -> None:
        end = self.now()
        marks, record = self._marks, self.records[-1]
        record.step = end - marks["start"]
        record.cpu = time.process_time() - marks["cpu"]
        record.phases["forward"] = marks["backward"] - marks["start"]
        record.phases["backward"] = marks["optimizer"] - marks["backward"]
        record.phases["optimizer"] = end - marks["optimizer"]
        if self.samples_per_prompt is None:
            record.phases["scoring"] = record.phases["forward"]
        self._marks = {}


@contextlib.contextmanager
def timed_rollout_calls(clock: PhaseClock) -> Iterator[None]:
    """Wrap the names the on-policy rollout calls (sampling, scoring) with the clock, then restore them."""
    saved = {name: getattr(on_policy, name) for name in ("generate_completions", "score_rows")}

    def sampled_tokens(completions: list[list[Completion]]) -> int:
        return sum(len(completion.token_ids) for row in completions for completion in row)

    try:
        on_policy.generate_completions = clock.timed(
            "generate", saved["generate_completions"], tokens=sampled_tokens
        )
        on_policy.score_rows = clock.timed("scoring", saved["score_rows"])
        yield
    finally:
        for name, function in saved.items():
            setattr(on_policy, name, function)


# ------------------------------------------------------------------------------------ the methods


def build(method: str, setup: Setup) -> tuple[L.LightningModule, L.LightningDataModule, int | None]:
    """The module and data module of ``method``, and its samples per prompt (None: offline pairs)."""
    common: dict[str, Any] = {"lr_schedule": "constant", "warmup_steps": 0, "dtype": setup.dtype}
    data: dict[str, Any] = {
        "train": DataSource(path=setup.data),
        "tokenizer_name_or_path": setup.model,
        "max_length": setup.max_length,
        "max_prompt_length": setup.max_prompt_length,
        "cache_dir": setup.cache_dir,
        "seed": setup.seed,
    }
    if method == "ipo":
        module = PreferenceModule(
            setup.model, loss_type="ipo", beta=0.5, max_length=setup.max_length, **common
        )
        return module, PreferenceDataModule(batch_size=setup.pairs, **data), None
    sampling: dict[str, Any] = {
        "max_new_tokens": setup.max_new_tokens,
        "generation_batch_size": setup.generation_batch_size,
        "max_length": setup.max_length,
        "sampling_seed": setup.seed,
        **common,
    }
    if method == "rloo":
        module = RLOOModule(setup.model, setup.reward, samples_per_prompt=setup.k, beta=0.05, **sampling)
    elif method == "online_ipo":
        module = OnlineModule(setup.model, setup.reward, loss_type="ipo", beta=0.5, **sampling)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    k = module.samples_per_prompt
    return module, PromptDataModule(batch_size=setup.completions // k, **data), k


def measure(method: str, setup: Setup) -> list[StepRecord]:
    """Train ``method`` for ``warmup + steps`` optimizer steps; the records of every step."""
    L.seed_everything(setup.seed, verbose=False)
    module, datamodule, k = build(method, setup)
    clock = PhaseClock(setup.device, k)
    trainer = L.Trainer(
        accelerator=setup.device,
        devices=1,
        precision=setup.precision,
        max_steps=setup.warmup + setup.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    with timed_rollout_calls(clock):
        trainer.fit(module, datamodule=datamodule)
    if len(clock.records) != setup.warmup + setup.steps:
        raise RuntimeError(f"{method}: {len(clock.records)} steps ran, expected {setup.warmup + setup.steps}")
    return clock.records


def summarize(method: str, timed: list[StepRecord]) -> dict[str, Any]:
    """Medians over the timed steps ``timed`` and the phases' shares of their summed step time."""
    total = sum(r.step for r in timed)
    step = statistics.median(r.step for r in timed)
    completions = statistics.median(r.completions for r in timed)
    out: dict[str, Any] = {
        "method": method,
        "steps": len(timed),
        "completions_per_step": completions,
        "step_s": step,
        "step_cpu_s": statistics.median(r.cpu for r in timed),
        "completions_per_s": completions / step,
        "tokens_per_completion": sum(r.tokens for r in timed) / sum(r.completions for r in timed),
    }
    for phase in PHASES:
        out[f"{phase}_s"] = statistics.median(r.phases[phase] for r in timed)
        out[f"{phase}_share"] = sum(r.phases[phase] for r in timed) / total
    out["scoring_backward_share"] = out["scoring_share"] + out["backward_share"]
    return out


def with_ratios(rounds: list[dict[str, dict[str, Any]]], pooled: dict[str, Any]) -> dict[str, Any]:
    """``pooled`` (one method's summary over every round's steps) with its ratios to the offline step:
    ``step_vs_ipo``, ``cpu_vs_ipo`` and ``completions_per_s_vs_ipo``, each the median over rounds of
    the ratio to the same round's offline step (``rounds``: per round, method -> that round's summary)."""
    method = pooled["method"]
    out = {**pooled, "rounds": len(rounds)}
    for name, key in (("step", "step_s"), ("cpu", "step_cpu_s"), ("completions_per_s", "completions_per_s")):
        out[f"{name}_vs_ipo"] = statistics.median(r[method][key] / r[BASELINE][key] for r in rounds)
    return out


def round_order(methods: list[str], round_index: int) -> list[str]:
    """The methods of round ``round_index``: each once, the first one rotating from round to round."""
    shift = round_index % len(methods)
    return methods[shift:] + methods[:shift]


DESCRIPTIONS = {
    "ipo": "offline IPO, {pairs} pairs",
    "rloo": "RLOO, {prompts} prompts x {k}",
    "online_ipo": "online IPO, {pairs} prompts x 2",
}


def markdown(summaries: list[dict[str, Any]], setup: Setup) -> str:
    """The summaries as a Markdown table: times in ms, shares of the step time in %, the step's wall and
    CPU time against offline IPO's; ``rest`` is the reward, the loss, zeroing and the optimizer step."""
    names = {"pairs": setup.pairs, "prompts": setup.completions // setup.k, "k": setup.k}
    lines = [
        "| method | tokens per completion | step ms | step CPU ms | completions/s | step time vs offline IPO "
        "| CPU time vs offline IPO | generating | scoring + backward | rest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        offline = s["method"] == BASELINE
        rest = 1 - s["generate_share"] - s["scoring_backward_share"]
        generating = "-" if offline else f"{100 * s['generate_share']:.0f}%"
        lines.append(
            f"| {DESCRIPTIONS[s['method']].format(**names)} | {s['tokens_per_completion']:.1f} "
            f"| {1000 * s['step_s']:.0f} | {1000 * s['step_cpu_s']:.0f} | {s['completions_per_s']:.0f} "
            f"| {s['step_vs_ipo']:.2f}x | {s['cpu_vs_ipo']:.2f}x | {generating} "
            f"| {100 * s['scoring_backward_share']:.0f}% | {100 * rest:.0f}% |"
        )
    return "\n".join(lines)


def run(setup: Setup, methods: tuple[str, ...] = METHODS) -> list[dict[str, Any]]:
    """Measure every method (and the offline baseline the ratios need) in ``setup.repeats`` rounds;
    one summary per method, the baseline first."""
    check_setup(setup)
    ordered = [BASELINE, *[m for m in methods if m != BASELINE]]
    steps: dict[str, list[StepRecord]] = {m: [] for m in ordered}
    rounds: list[dict[str, dict[str, Any]]] = []
    for round_index in range(setup.repeats):
        this_round = {}
        for method in round_order(ordered, round_index):
            timed = measure(method, setup)[setup.warmup :]
            steps[method] += timed
            this_round[method] = summarize(method, timed)
        rounds.append(this_round)
    return [with_ratios(rounds, summarize(m, steps[m])) for m in ordered]


def main(argv: list[str] | None = None) -> None:
    """Parse flags, measure every method, print JSON lines and the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Setup()
    for name in Setup.__dataclass_fields__:
        if name == "cache_dir":
            continue
        default = getattr(defaults, name)
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady when shared)")
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    options = {name: getattr(args, name) for name in Setup.__dataclass_fields__ if name != "cache_dir"}
    with tempfile.TemporaryDirectory(prefix="rl-step-") as cache:
        setup = Setup(**options, cache_dir=str(Path(cache) / "datasets"))
        try:
            check_setup(setup)
        except ValueError as error:
            parser.error(str(error))
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore")
        summaries = run(setup, methods)
    context = {"device": setup.device, "dtype": setup.dtype, "threads": torch.get_num_threads()}
    for summary in summaries:
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
        print(json.dumps({**rounded, **context}), flush=True)
    print()
    print(markdown(summaries, setup))


if __name__ == "__main__":
    main()
