"""Training throughput of ipo_lightning's modes against TRL's DPOTrainer (IPO loss) and an SFT step.

Every mode trains the same tiny Llama-architecture model (random init, float32, sdpa, built from a
config and a byte-level BPE tokenizer trained offline) on the same text pairs (a JSONL file of
``prompt``/``chosen``/``rejected`` strings), 8 pairs per step, AdamW, each run in a fresh process
that is the only benchmark process alive, and each framework runs the way its users run it:

- ipo_lightning: ``python -m ipo_lightning fit --config run.yaml``, the data module tokenising the
  JSONL file itself, with the CLI's defaults (CSV and W&B loggers, W&B set to offline so nothing
  leaves the machine; checkpoint and export at the end; ``model.batching`` its default ``auto``
  unless the mode names a layout). Added: a timing callback in ``trainer.callbacks``. Changed:
  AdamW with ``fused=True``, the kernel of TRL's default optimizer ``adamw_torch_fused`` (the same
  optimizer on both sides; the per-tensor loop costs several times more per step on a CPU), and the
  divergence monitor off (it measures before the first step and every 500 steps, so never inside
  the timed loop, but its step-0 sampling would make these short runs several times longer). The
  ``sft`` floor uses the same fused AdamW.
- TRL: ``DPOTrainer(model=<model folder>, args=DPOConfig(loss_type=["ipo"], ...),
  train_dataset=load_dataset("json", ...))``: its own tokenisation, its own reference (created
  from the model folder; none kept with ``precompute_ref_log_probs``), its own data loader and
  shuffling, its defaults for everything else (optimizer ``adamw_torch_fused``, logging). Changed
  from its defaults, for fairness only: ``bf16=False`` (float32 as every mode here; TRL would
  autocast to bfloat16 where the hardware supports it), ``gradient_checkpointing=False`` (TRL's
  default recomputes activations; no other mode does), ``per_device_train_batch_size`` and
  ``learning_rate`` (the workload's), ``max_steps``, ``beta``, ``lr_scheduler_type="constant"`` (as
  the ipo_lightning runs; the schedule costs nothing), ``save_strategy="no"`` and a temporary
  ``output_dir``, and the timing callback.
- ``sft``: the floor: the policy's step alone (mean completion-token NLL of the same padded rows,
  no reference, no preference loss) through a plain ``lightning.Trainer`` without loggers, on the
  same data module.

Every process gets the same ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (``--threads``) and fresh,
empty dataset/model caches (so the precompute passes run every time). A run is timed from the end
of its ``--warmup``-th optimizer step to the end of its last one: the loop as it runs, data loading,
collation, forward, backward, optimizer step and logging included; ``pairs_per_cpu_s`` uses the
process's CPU seconds over the same span (all its threads), which load from other processes on a
shared machine changes less than wall time. ``peak_rss_mb`` is the process's peak resident memory
(the whole run: imports, tokenisation, precompute pass and training).

Rounds run every mode once, one after the other (round-robin, the order rotating from round to
round), so a mode's rounds are spread over the measurement. Output: one JSON line per run
(``"kind": "run"``), then one per mode (``"kind": "summary"``) with medians over rounds and, for
each baseline ``<base>`` measured beside it, ``vs_<base>`` (median over rounds of the pairs/s ratio
to the same round's baseline run), ``cpu_vs_<base>`` (the same with pairs per CPU second) and
``rss_vs_<base>``.

    python benchmarks/throughput.py --repeats 2 --steps 20          # every mode
    python benchmarks/throughput.py --modes default,trl_ipo --repeats 3
    python benchmarks/throughput.py --summarize out.jsonl            # summaries of an earlier output

Modes are a registry (:data:`MODES`): add one with :func:`register`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workload:
    """The model, data and optimizer every mode trains with (each a command-line flag)."""

    hidden: int = 256
    layers: int = 4
    heads: int = 8
    vocab: int = 4096
    prompt_max: int = 48
    completion_max: int = 80
    jitter: float = 0.25
    batch_size: int = 8
    lr: float = 1e-4
    threads: int = 2
    warmup: int = 2
    steps: int = 8
    beta: float = 0.1
    seed: int = 0

    def key(self) -> str:
        """A short hash of what the prepared model and pairs depend on (the cache folder's name)."""
        data = {k: getattr(self, k) for k in ("hidden", "layers", "heads", "vocab", "prompt_max")}
        data.update(completion_max=self.completion_max, jitter=self.jitter, seed=self.seed)
        data.update(pairs=self.num_pairs, format="text")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def num_pairs(self) -> int:
        """Pairs of one run: one epoch of ``warmup + steps`` full batches."""
        return self.batch_size * (self.warmup + self.steps)


# ------------------------------------------------------------------------------- model and data

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def _corpus(seed: int, sentences: int = 20000) -> list[str]:
    """Pseudo-words from syllables: enough distinct merges for a several-thousand-token BPE vocabulary."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(6000)]
    return [" ".join(rng.choices(words, k=rng.randint(8, 24))) + "." for _ in range(sentences)]


def prepare(work: Workload, root: Path) -> Path:
    """Save the model, tokenizer and text pairs under ``root/<key>`` once; return that folder.

    ``pairs.jsonl`` holds the pairs as text; ``lengths.json`` their token counts as ipo_lightning
    tokenises them (prompt, chosen + EOS, rejected + EOS): prompts of ``(1 - jitter) * prompt_max``
    to ``prompt_max`` tokens, completions likewise with ``completion_max``.
    """
    from transformers import AutoTokenizer

    from ipo_lightning.tiny import save_tiny_model

    folder = root / work.key()
    if (folder / "lengths.json").exists():
        return folder
    corpus = _corpus(work.seed)
    save_tiny_model(
        folder / "model",
        corpus,
        vocab_size=work.vocab,
        seed=work.seed,
        hidden_size=work.hidden,
        num_layers=work.layers,
        num_heads=work.heads,
        max_position_embeddings=max(512, work.prompt_max + 2 * work.completion_max),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    rng = random.Random(work.seed + 1)
    words = " ".join(corpus[:4000]).split()

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(longest: int, lead: str, eos: bool) -> str:
        # Whole words until the text has the drawn number of tokens (one less for a completion's EOS).
        target = rng.randint(max(1, round(longest * (1 - work.jitter))), longest) - int(eos)
        start = rng.randrange(len(words) - 4 * longest)
        out = lead + words[start]
        for word in words[start + 1 :]:
            longer = f"{out} {word}"
            if len(encode(longer)) > target:
                break
            out = longer
        return out

    pairs = [
        {
            "prompt": text(work.prompt_max, "", eos=False),
            "chosen": text(work.completion_max, " ", eos=True),
            "rejected": text(work.completion_max, " ", eos=True),
        }
        for _ in range(work.num_pairs)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    lengths = [
        [len(encode(p["prompt"])), len(encode(p["chosen"])) + 1, len(encode(p["rejected"])) + 1]
        for p in pairs
    ]
    (folder / "lengths.json").write_text(json.dumps(lengths))
    return folder


def real_tokens(lengths: list[list[int]]) -> int:
    """Tokens of the 2B prompt+completion sequences of these pairs (no padding, prompt counted twice)."""
    return sum(2 * prompt + chosen + rejected for prompt, chosen, rejected in lengths)


# ------------------------------------------------------------------------------------ the modes


@dataclass(frozen=True)
class Run:
    """Where one run keeps its files: its scratch folder and the clock's output."""

    folder: Path
    """The prepared workload (model, tokenizer, pairs)."""
    scratch: Path
    """An empty folder of this run only (caches, run folders, configs)."""

    @property
    def clock(self) -> Path:
        """The JSON file the step clock writes at the end of training."""
        return self.scratch / "clock.json"


@dataclass(frozen=True)
class Mode:
    """A way of training: ``command(work, run)`` is the command line of one run, in a fresh process."""

    name: str
    description: str
    command: Callable[[Workload, Run], list[str]]
    needs: str | None = None
    """An optional package the mode needs; the mode is skipped when it is missing."""


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add ``mode`` to the registry."""
    MODES[mode.name] = mode
    return mode


def cli_config(work: Workload, run: Run, *, batching: str | None, precomputed: bool) -> dict[str, Any]:
    """The ``fit`` config of an ipo_lightning run: the workload's settings, the CLI's defaults otherwise."""
    model: dict[str, Any] = {
        "model_name_or_path": str(run.folder / "model"),
        "loss_type": "ipo",
        "beta": work.beta,
        # fused: the same AdamW kernel as TRL's default optimizer (adamw_torch_fused).
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": work.lr, "fused": True}},
        "lr_schedule": "constant",
        "warmup_steps": 0,
    }
    if batching is not None:
        model["batching"] = batching
    if precomputed:
        model["reference"] = "precomputed"
    clock = {"class_path": "step_clock.LightningStepClock", "init_args": {"out": str(run.clock)}}
    return {
        "seed_everything": work.seed,
        "trainer": {
            "default_root_dir": str(run.scratch / "runs"),
            "max_steps": work.warmup + work.steps,
            "callbacks": [clock],
        },
        "model": model,
        "data": {
            "train": {"path": str(run.folder / "pairs.jsonl")},
            "batch_size": work.batch_size,
            "cache_dir": str(run.scratch / "cache"),
            "seed": work.seed,
        },
        "wandb": {"mode": "offline"},
        # On by default; it measures before the first step and every 500 steps, outside the timed
        # loop, but its step-0 sampling would dominate the length of these short runs.
        "divergence": {"enabled": False},
    }


def _cli_command(work: Workload, run: Run, *, batching: str | None, precomputed: bool = False) -> list[str]:
    import yaml

    config = run.scratch / "run.yaml"
    config.write_text(yaml.safe_dump(cli_config(work, run, batching=batching, precomputed=precomputed)))
    return [sys.executable, "-m", "ipo_lightning", "fit", "--config", str(config)]


def _worker_command(mode: str, work: Workload, run: Run) -> list[str]:
    flags = [f"--{f.name.replace('_', '-')}={getattr(work, f.name)}" for f in dataclasses.fields(Workload)]
    return [sys.executable, __file__, "--worker", mode, "--scratch", str(run.scratch), *flags]


for _name, _batching, _precomputed, _description in (
    ("default", None, False, "ipo_lightning fit, defaults (model.batching auto), frozen reference"),
    ("padded", "padded", False, "ipo_lightning fit, model.batching padded"),
    ("padding_free", "padding_free", False, "ipo_lightning fit, model.batching padding_free"),
    ("prefix_shared", "prefix_shared", False, "ipo_lightning fit, model.batching prefix_shared"),
    ("precomputed", None, True, "ipo_lightning fit, model.reference precomputed (batching auto)"),
    ("precomputed_padded", "padded", True, "ipo_lightning fit, model.reference precomputed, padded"),
):
    register(
        Mode(
            _name,
            _description,
            lambda work, run, b=_batching, p=_precomputed: _cli_command(work, run, batching=b, precomputed=p),
        )
    )
register(
    Mode(
        "sft",
        "SFT step (completion NLL) on the same padded rows: plain Trainer, no reference, no loggers",
        lambda work, run: _worker_command("sft", work, run),
    )
)
register(
    Mode(
        "trl_ipo",
        "TRL DPOTrainer(loss_type=ipo), its defaults (reference created from the model folder)",
        lambda work, run: _worker_command("trl_ipo", work, run),
        needs="trl",
    )
)
register(
    Mode(
        "trl_ipo_precompute",
        "TRL DPOTrainer(loss_type=ipo), precompute_ref_log_probs=True",
        lambda work, run: _worker_command("trl_ipo_precompute", work, run),
        needs="trl",
    )
)
DEFAULT_MODES = ("sft", "default", "padded", "padding_free", "precomputed", "trl_ipo", "trl_ipo_precompute")
"""What a plain run measures (``prefix_shared`` is what ``default`` resolves to with sdpa)."""
BASELINES = ("sft", "padded", "trl_ipo", "trl_ipo_precompute")


# ----------------------------------------------------------------------------- in-script workers


def _trl_worker(work: Workload, run: Run, *, precompute: bool) -> None:
    """TRL's DPOTrainer as its users run it (see the module docstring for every changed default)."""
    from datasets import load_dataset
    from step_clock import TrainerStepClock
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(run.scratch / "trl_output"),
        loss_type=["ipo"],
        beta=work.beta,
        per_device_train_batch_size=work.batch_size,
        learning_rate=work.lr,
        lr_scheduler_type="constant",
        max_steps=work.warmup + work.steps,
        precompute_ref_log_probs=precompute,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=work.seed,
    )
    trainer = DPOTrainer(
        model=str(run.folder / "model"),
        args=config,
        train_dataset=load_dataset("json", data_files=str(run.folder / "pairs.jsonl"), split="train"),
        callbacks=[TrainerStepClock(str(run.clock))],
    )
    dtypes = {str(p.dtype) for p in trainer.model.parameters()}
    if dtypes != {"torch.float32"}:
        sys.exit(f"TRL's policy is {dtypes}, not float32")
    trainer.train()


def _sft_worker(work: Workload, run: Run) -> None:
    """The policy's step alone on ipo_lightning's padded rows of the same data (no reference)."""
    import lightning as L
    import torch
    from step_clock import LightningStepClock

    from ipo_lightning.batching import batch_scores
    from ipo_lightning.data import DataSource, PreferenceDataModule
    from ipo_lightning.module import PreferenceModule

    class SFTModule(PreferenceModule):
        """Mean completion-token NLL of the chosen and rejected rows: a step without reference or loss."""

        def setup(self, stage: str) -> None:
            pass  # no reference, no soft-label check

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            return -batch_scores(self.policy, *rows, batching="padded").token_logps.mean()

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            pass  # no preference metrics

    L.seed_everything(work.seed)
    model_dir = str(run.folder / "model")
    module = SFTModule(
        model_dir,
        reference="precomputed",  # no reference model is loaded (setup, which would score, is skipped)
        optimizer=lambda params: torch.optim.AdamW(params, lr=work.lr, fused=True),
        lr_schedule="constant",
        warmup_steps=0,
        batching="padded",
    )
    data = PreferenceDataModule(
        train=DataSource(path=str(run.folder / "pairs.jsonl")),
        tokenizer_name_or_path=model_dir,
        batch_size=work.batch_size,
        cache_dir=str(run.scratch / "cache"),
        seed=work.seed,
    )
    trainer = L.Trainer(
        max_steps=work.warmup + work.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LightningStepClock(str(run.clock))],
    )
    trainer.fit(module, datamodule=data)


WORKERS: dict[str, Callable[[Workload, Run], None]] = {
    "sft": _sft_worker,
    "trl_ipo": lambda work, run: _trl_worker(work, run, precompute=False),
    "trl_ipo_precompute": lambda work, run: _trl_worker(work, run, precompute=True),
}


# ------------------------------------------------------------------------------------ driver


def run_environment(work: Workload, scratch: Path) -> dict[str, str]:
    """The environment of every run: the same threads, this repository and the step clock importable,
    caches inside the run's scratch folder, W&B offline."""
    env = dict(os.environ)
    path = [str(REPO), str(BENCHMARKS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        OMP_NUM_THREADS=str(work.threads),
        MKL_NUM_THREADS=str(work.threads),
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_CACHE=str(scratch / "hf_datasets"),
        IPO_LIGHTNING_CACHE=str(scratch / "ipo_lightning"),
        WANDB_DIR=str(scratch / "wandb"),
    )
    return env


def summarize_run(
    mode: str, work: Workload, lengths: list[list[int]], clock: dict[str, Any]
) -> dict[str, Any]:
    """One run's numbers from its clock marks: from the last warm-up step's end to the last step's."""
    marks = clock["marks"]
    if len(marks) != work.warmup + work.steps:
        raise ValueError(f"{mode}: {len(marks)} steps ran, expected {work.warmup + work.steps}")
    timed = marks[work.warmup - 1 :]  # the last warm-up step's end, then the end of every timed step
    wall, cpu = timed[-1][0] - timed[0][0], timed[-1][1] - timed[0][1]
    pairs = work.steps * work.batch_size
    # Both frameworks shuffle the pairs, so the token count is the workload's mean per pair.
    tokens = real_tokens(lengths) * pairs / len(lengths)
    return {
        "mode": mode,
        "pairs_per_s": pairs / wall,
        "tokens_per_s": tokens / wall,
        "pairs_per_cpu_s": pairs / cpu,
        "peak_rss_mb": clock["peak_rss_mb"],
        "steps": work.steps,
        "step_wall_s": [
            round(after[0] - before[0], 4) for before, after in zip(timed, timed[1:], strict=False)
        ],
    }


def _run_once(mode: str, work: Workload, folder: Path) -> dict[str, Any]:
    """Run ``mode`` once in a fresh process (nothing else of the benchmark alive) and read its clock."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{mode}-") as scratch_dir:
        run = Run(folder=folder, scratch=Path(scratch_dir))
        command = MODES[mode].command(work, run)
        result = subprocess.run(
            command, env=run_environment(work, run.scratch), cwd=run.scratch, capture_output=True, text=True
        )
        if result.returncode != 0 or not run.clock.exists():
            sys.exit(f"mode {mode} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        out = summarize_run(
            mode, work, json.loads((folder / "lengths.json").read_text()), json.loads(run.clock.read_text())
        )
        saved = list((run.scratch / "runs").glob("*/config.yaml"))
        if saved:  # what the run recorded it used (auto resolved)
            import yaml

            out["batching"] = yaml.safe_load(saved[0].read_text())["model"]["batching"]
        return out


def _available(mode: str) -> bool:
    needs = MODES[mode].needs
    if needs is None:
        return True
    import importlib.util

    return importlib.util.find_spec(needs) is not None


def _summaries(runs: list[dict[str, Any]], modes: list[str], repeats: int) -> list[dict[str, Any]]:
    """Per mode: medians over rounds, and ratios against the baselines of the same rounds.

    ``vs_<base>`` is the median over rounds of ``mode pairs/s / base pairs/s`` (both runs of that
    round); ``cpu_vs_<base>`` the same with pairs per CPU second; ``rss_vs_<base>`` the median ratio
    of peak RSS.
    """
    by_round = {(r["mode"], r["round"]): r for r in runs}
    out = []
    for mode in modes:
        mine = [by_round[(mode, k)] for k in range(repeats) if (mode, k) in by_round]
        if not mine:
            continue
        summary: dict[str, Any] = {"kind": "summary", "mode": mode}
        if mode in MODES:
            summary["description"] = MODES[mode].description
        for key in ("pairs_per_s", "tokens_per_s", "pairs_per_cpu_s", "peak_rss_mb"):
            summary[key] = round(statistics.median(r[key] for r in mine), 2)
        summary["steps"] = sum(r["steps"] for r in mine)
        summary["rounds"] = len(mine)
        for base in BASELINES:
            rounds = [k for k in range(repeats) if (mode, k) in by_round and (base, k) in by_round]
            if not rounds:
                continue
            for prefix, key in (
                ("vs", "pairs_per_s"),
                ("cpu_vs", "pairs_per_cpu_s"),
                ("rss_vs", "peak_rss_mb"),
            ):
                ratios = [by_round[(mode, k)][key] / by_round[(base, k)][key] for k in rounds]
                summary[f"{prefix}_{base}"] = round(statistics.median(ratios), 3)
        out.append(summary)
    return out


def round_order(modes: list[str], round_index: int) -> list[str]:
    """The modes of round ``round_index``: every mode once, the first one rotating from round to round."""
    shift = round_index % len(modes)
    return modes[shift:] + modes[:shift]


def main(argv: list[str] | None = None) -> None:
    """Parse flags, prepare the workload once, run the modes round-robin in fresh processes, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(Workload):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default)
    parser.add_argument(
        "--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from {', '.join(MODES)}"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds, each running every mode once")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ipo_lightning_bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--summarize", type=Path, help="print summaries of the run lines of an earlier output"
    )
    args = parser.parse_args(argv)
    if args.summarize:  # e.g. a run cut short: summarise the rounds it finished
        lines = [json.loads(line) for line in args.summarize.read_text().splitlines() if line.startswith("{")]
        runs = [r for r in lines if r.get("kind") == "run"]
        modes = list(dict.fromkeys(r["mode"] for r in runs))
        for summary in _summaries(runs, modes, max(r["round"] for r in runs) + 1):
            print(json.dumps(summary))
        return
    work = Workload(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)})
    if work.warmup < 1 or work.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (timing starts at the end of a warm-up step)")
    folder = prepare(work, args.cache)
    if args.worker:
        import torch

        torch.manual_seed(work.seed)
        WORKERS[args.worker](work, Run(folder=folder, scratch=args.scratch))
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    skipped = [m for m in modes if not _available(m)]
    for mode in skipped:
        print(
            json.dumps({"kind": "skipped", "mode": mode, "reason": f"{MODES[mode].needs} is not installed"})
        )
    modes = [m for m in modes if m not in skipped]
    runs = []
    for round_index in range(args.repeats):
        for mode in round_order(modes, round_index):
            result = _run_once(mode, work, folder)
            result.update(kind="run", round=round_index)
            runs.append(result)
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
                flush=True,
            )
    for summary in _summaries(runs, modes, args.repeats):
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
