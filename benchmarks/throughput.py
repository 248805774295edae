"""Training throughput of ipo_lightning's modes against TRL's DPOTrainer (IPO loss) and an SFT step.

Every mode trains the same tiny Llama-architecture model (random init, float32, sdpa, built from a
config and a byte-level BPE tokenizer trained offline; ``--model`` names a Qwen2 shape of
:data:`QWEN2_SHAPES` instead) on the same text pairs (a JSONL file of
``prompt``/``chosen``/``rejected`` strings), 8 pairs per step, AdamW, each run in a fresh process
that is the only benchmark process alive, and each framework runs the way its users run it:

- ipo_lightning: ``python -m ipo_lightning fit --config run.yaml``, the data module tokenising the
  JSONL file itself, with the CLI's defaults (CSV and W&B loggers, W&B set to offline so nothing
  leaves the machine; checkpoint and export at the end; ``model.batching`` its default ``auto``
  unless the mode names a layout). Added: a timing callback in ``trainer.callbacks``. Changed:
  AdamW with ``fused=True``, the kernel of TRL's default optimizer ``adamw_torch_fused`` (the same
  optimizer on both sides; the per-tensor loop costs several times more per step on a CPU), and the
  divergence monitor off (it measures before the first step and every 500 steps, so never inside
  the timed loop, but its step-0 sampling would make these short runs several times longer);
  ``data.max_length`` the workload's prompt + completion and no prompt cut, so no pair is cut. The
  ``sft`` floor uses the same fused AdamW.
- TRL: ``DPOTrainer(model=<model folder>, args=DPOConfig(loss_type=["ipo"], ...),
  train_dataset=load_dataset("json", ...))``: its own tokenisation, its own reference (created
  from the model folder; none kept with ``precompute_ref_log_probs``), its own data loader and
  shuffling, its defaults for everything else (optimizer ``adamw_torch_fused``, logging). Changed
  from its defaults, for fairness only: ``bf16=False`` (float32 as every mode here; TRL would
  autocast to bfloat16 where the hardware supports it), ``gradient_checkpointing=False`` (TRL's
  default recomputes activations; no other mode does), ``max_length=None`` (its default 1024 would
  cut long pairs; none is cut on either side), ``per_device_train_batch_size`` and
  ``learning_rate`` (the workload's), ``max_steps``, ``beta``, ``lr_scheduler_type="constant"`` (as
  the ipo_lightning runs; the schedule costs nothing), ``save_strategy="no"`` and a temporary
  ``output_dir``, and the timing callback.
- ``sft``: the floor: the policy's step alone (mean completion-token NLL of the same padded rows,
  no reference, no preference loss) through a plain ``lightning.Trainer`` without loggers, on the
  same data module.

``--precision bf16`` gives both frameworks the same mixed precision (float32 weights, bfloat16
autocast): ``trainer.precision: bf16-mixed`` and TRL's ``bf16=True`` (with ``use_cpu=True`` on a
machine without a GPU, where TRL runs on the CPU anyway but refuses bf16 without it). ``--lean 1``
leaves out what ipo_lightning runs after the timed loop (checkpoint, export) and its W&B logger,
which TRL (``report_to="none"`` by default) does not have. ``trl_ipo_liger`` is TRL with
``use_liger_kernel=True`` (CUDA only): in TRL 1.16 that patches the policy's RMSNorm, RoPE and
SwiGLU with Liger's kernels and keeps TRL's own chunked log-prob head (Liger's fused linear
cross-entropy is refused by the DPOTrainer); TRL 1.16 has no Liger DPO/IPO loss, and its
``padding_free`` is disabled for DPO (it warns and pads), so neither is a mode.

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
    """The tokenizer's vocabulary (and the tiny Llama's; a Qwen2 shape has its own, larger one)."""
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
    model: str = "llama"
    """``llama``: the tiny Llama of ``hidden``/``layers``/``heads``; or a name of :data:`QWEN2_SHAPES`."""
    precision: str = "32"
    """``32``: float32 throughout; ``bf16``: float32 weights, bfloat16 autocast (``trainer.precision:
    bf16-mixed`` for ipo_lightning, ``bf16=True`` for TRL: the same mixed precision)."""
    lean: int = 0
    """1: no W&B logger, end-of-fit checkpoint or export for ipo_lightning (what runs after the timed
    loop, and the logger TRL's ``report_to="none"`` default does not have); 0: the CLI's defaults."""
    unique_pairs: int = 0
    """Distinct pairs; the pairs file repeats them to ``num_pairs`` lines (0: every pair distinct)."""

    def model_key(self) -> str:
        """A short hash of what the prepared model and tokenizer depend on (their folder's name)."""
        data: dict[str, Any] = {"model": self.model, "vocab": self.vocab, "seed": self.seed}
        if self.model == "llama":
            data.update(hidden=self.hidden, layers=self.layers, heads=self.heads, positions=self.positions)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def key(self) -> str:
        """A short hash of what the prepared pairs depend on (their folder's name)."""
        data = {k: getattr(self, k) for k in ("prompt_max", "completion_max", "jitter", "unique_pairs")}
        data.update(model=self.model_key(), pairs=self.num_pairs, format="text")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def num_pairs(self) -> int:
        """Pairs of one run: one epoch of ``warmup + steps`` full batches."""
        return self.batch_size * (self.warmup + self.steps)

    @property
    def positions(self) -> int:
        """The tiny Llama's context: at least the longest pair's row."""
        return max(512, self.prompt_max + 2 * self.completion_max)

    @property
    def max_length(self) -> int:
        """Most tokens of prompt + one completion: no pair is cut (``data.max_length``)."""
        return self.prompt_max + self.completion_max


QWEN2_SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B's shapes (random weights): 494M parameters, the embedding tied to the LM head.
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # The same architecture in miniature, for a CPU dry run.
    "qwen2-small": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 224,
        "vocab_size": 4096,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}
"""Qwen2 model shapes by ``Workload.model`` name; the tokenizer (``Workload.vocab``) may be smaller
than the embedding, whose size is what the LM head costs."""


# ------------------------------------------------------------------------------- model and data

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def _corpus(seed: int, sentences: int = 20000) -> list[str]:
    """Pseudo-words from syllables: enough distinct merges for a several-thousand-token BPE vocabulary."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(6000)]
    return [" ".join(rng.choices(words, k=rng.randint(8, 24))) + "." for _ in range(sentences)]


def _save_qwen2(folder: Path, work: Workload, corpus: list[str]) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ipo_lightning.tiny import build_tokenizer

    tokenizer = build_tokenizer(corpus, vocab_size=work.vocab)
    config = Qwen2Config(
        **QWEN2_SHAPES[work.model],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    torch.manual_seed(work.seed)
    model = Qwen2ForCausalLM(config).eval()  # float32, as the tiny Llama
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare_model(work: Workload, root: Path) -> Path:
    """Save the model and tokenizer under ``root/model-<model key>`` once; return that folder."""
    from ipo_lightning.tiny import save_tiny_model

    folder = root / f"model-{work.model_key()}"
    if (folder / "config.json").exists():
        return folder
    if work.model != "llama" and work.model not in QWEN2_SHAPES:
        raise ValueError(f"--model {work.model!r}: choose llama or one of {', '.join(QWEN2_SHAPES)}")
    partial = root / f"{folder.name}.partial-{os.getpid()}"  # renamed when complete
    corpus = _corpus(work.seed)
    if work.model == "llama":
        save_tiny_model(
            partial,
            corpus,
            vocab_size=work.vocab,
            seed=work.seed,
            hidden_size=work.hidden,
            num_layers=work.layers,
            num_heads=work.heads,
            max_position_embeddings=work.positions,
        )
    else:
        _save_qwen2(partial, work, corpus)
    partial.rename(folder)
    return folder


def prepare(work: Workload, root: Path) -> tuple[Path, Path]:
    """The model folder (:func:`prepare_model`) and the pairs' folder ``root/<key>``, each made once.

    ``pairs.jsonl`` holds the pairs as text; ``lengths.json`` their token counts as ipo_lightning
    tokenises them (prompt, chosen + EOS, rejected + EOS): prompts of ``(1 - jitter) * prompt_max``
    to ``prompt_max`` tokens, completions likewise with ``completion_max``.
    """
    from transformers import AutoTokenizer

    model = prepare_model(work, root)
    folder = root / work.key()
    if (folder / "lengths.json").exists():
        return model, folder
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(work.seed + 1)
    words = " ".join(_corpus(work.seed)[:4000]).split()

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(longest: int, lead: str, eos: bool) -> str:
        # The most whole words within the drawn number of tokens (one less for a completion's EOS);
        # a word never takes tokens away, so the count is monotone and bisection finds that many.
        target = rng.randint(max(1, round(longest * (1 - work.jitter))), longest) - int(eos)
        start = rng.randrange(len(words) - 4 * longest)
        low, high = 1, 4 * longest  # words: low always fits (at least the first word), high never does
        while high - low > 1:
            middle = (low + high) // 2
            if len(encode(lead + " ".join(words[start : start + middle]))) > target:
                high = middle
            else:
                low = middle
        return lead + " ".join(words[start : start + low])

    distinct = work.unique_pairs or work.num_pairs
    pairs = [
        {
            "prompt": text(work.prompt_max, "", eos=False),
            "chosen": text(work.completion_max, " ", eos=True),
            "rejected": text(work.completion_max, " ", eos=True),
        }
        for _ in range(min(distinct, work.num_pairs))
    ]
    pairs = [pairs[i % len(pairs)] for i in range(work.num_pairs)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    lengths = [
        [len(encode(p["prompt"])), len(encode(p["chosen"])) + 1, len(encode(p["rejected"])) + 1]
        for p in pairs
    ]
    (folder / "lengths.json").write_text(json.dumps(lengths))
    return model, folder


def real_tokens(lengths: list[list[int]]) -> int:
    """Tokens of the 2B prompt+completion sequences of these pairs (no padding, prompt counted twice)."""
    return sum(2 * prompt + chosen + rejected for prompt, chosen, rejected in lengths)


# ------------------------------------------------------------------------------------ the modes


@dataclass(frozen=True)
class Run:
    """What one run trains on and where it keeps its files: its scratch folder and the clock's output."""

    model: Path
    """The prepared model and tokenizer folder."""
    pairs: Path
    """The JSONL file of text pairs."""
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
    needs: tuple[str, ...] = ()
    """Optional packages the mode needs; the mode is skipped when one is missing."""
    cuda: bool = False
    """The mode runs on a CUDA device only; skipped without one."""


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add ``mode`` to the registry."""
    MODES[mode.name] = mode
    return mode


def cli_config(work: Workload, run: Run, *, batching: str | None, precomputed: bool) -> dict[str, Any]:
    """The ``fit`` config of an ipo_lightning run: the workload's settings, the CLI's defaults otherwise."""
    model: dict[str, Any] = {
        "model_name_or_path": str(run.model),
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
    trainer: dict[str, Any] = {
        "default_root_dir": str(run.scratch / "runs"),
        "max_steps": work.warmup + work.steps,
        "callbacks": [clock],
    }
    if work.precision == "bf16":
        trainer["precision"] = "bf16-mixed"
    config: dict[str, Any] = {
        "seed_everything": work.seed,
        "trainer": trainer,
        "model": model,
        "data": {
            "train": {"path": str(run.pairs)},
            "batch_size": work.batch_size,
            "cache_dir": str(run.scratch / "cache"),
            "seed": work.seed,
            **data_lengths(work),
        },
        "wandb": {"mode": "offline"},
        # On by default; it measures before the first step and every 500 steps, outside the timed
        # loop, but its step-0 sampling would dominate the length of these short runs.
        "divergence": {"enabled": False},
    }
    if work.lean:
        trainer["enable_checkpointing"] = False
        config["export"] = {"enabled": False}
        config["wandb"] = {"enabled": False}
    return config


def data_lengths(work: Workload) -> dict[str, int | None]:
    """ipo_lightning's data length options for the workload: no prompt or pair is cut."""
    return {"max_length": work.max_length, "max_prompt_length": None}


def _cli_command(work: Workload, run: Run, *, batching: str | None, precomputed: bool = False) -> list[str]:
    import yaml

    config = run.scratch / "run.yaml"
    config.write_text(yaml.safe_dump(cli_config(work, run, batching=batching, precomputed=precomputed)))
    return [sys.executable, "-m", "ipo_lightning", "fit", "--config", str(config)]


def workload_flags(work: Workload) -> list[str]:
    """The command-line flags that give back ``work``."""
    return [f"--{f.name.replace('_', '-')}={getattr(work, f.name)}" for f in dataclasses.fields(Workload)]


def _worker_command(mode: str, work: Workload, run: Run) -> list[str]:
    paths = ["--scratch", str(run.scratch), "--run-model", str(run.model), "--run-pairs", str(run.pairs)]
    return [sys.executable, __file__, "--worker", mode, *paths, *workload_flags(work)]


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
        needs=("trl",),
    )
)
register(
    Mode(
        "trl_ipo_precompute",
        "TRL DPOTrainer(loss_type=ipo), precompute_ref_log_probs=True",
        lambda work, run: _worker_command("trl_ipo_precompute", work, run),
        needs=("trl",),
    )
)
register(
    Mode(
        "trl_ipo_liger",
        "TRL DPOTrainer(loss_type=ipo), use_liger_kernel=True (Liger's RMSNorm, RoPE and SwiGLU kernels)",
        lambda work, run: _worker_command("trl_ipo_liger", work, run),
        needs=("trl", "liger_kernel"),
        cuda=True,
    )
)
DEFAULT_MODES = ("sft", "default", "padded", "padding_free", "precomputed", "trl_ipo", "trl_ipo_precompute")
"""What a plain run measures (``prefix_shared`` is what ``default`` resolves to with sdpa)."""
BASELINES = ("sft", "padded", "trl_ipo", "trl_ipo_precompute")


# ----------------------------------------------------------------------------- in-script workers


def _trl_worker(work: Workload, run: Run, *, precompute: bool, liger: bool = False) -> None:
    """TRL's DPOTrainer as its users run it (see the module docstring for every changed default)."""
    import torch
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
        bf16=work.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),  # what TRL runs on anyway; bf16 on a CPU needs it said
        use_liger_kernel=liger,
        gradient_checkpointing=False,
        max_length=None,  # no pair is cut (its default 1024 would cut the long ones)
        save_strategy="no",
        seed=work.seed,
    )
    trainer = DPOTrainer(
        model=str(run.model),
        args=config,
        train_dataset=load_dataset("json", data_files=str(run.pairs), split="train"),
        callbacks=[TrainerStepClock(str(run.clock))],
    )
    # The same policy as ipo_lightning's: float32 weights (bf16 only inside autocast), sdpa.
    dtypes = {str(p.dtype) for p in trainer.model.parameters()}
    if dtypes != {"torch.float32"}:
        sys.exit(f"TRL's policy is {dtypes}, not float32")
    if trainer.model.config._attn_implementation != "sdpa":
        sys.exit(f"TRL's policy runs {trainer.model.config._attn_implementation}, not sdpa")
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
    model_dir = str(run.model)
    module = SFTModule(
        model_dir,
        reference="precomputed",  # no reference model is loaded (setup, which would score, is skipped)
        optimizer=lambda params: torch.optim.AdamW(params, lr=work.lr, fused=True),
        lr_schedule="constant",
        warmup_steps=0,
        batching="padded",
    )
    data = PreferenceDataModule(
        train=DataSource(path=str(run.pairs)),
        tokenizer_name_or_path=model_dir,
        batch_size=work.batch_size,
        cache_dir=str(run.scratch / "cache"),
        seed=work.seed,
        **data_lengths(work),
    )
    trainer = L.Trainer(
        max_steps=work.warmup + work.steps,
        precision="bf16-mixed" if work.precision == "bf16" else "32-true",
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
    "trl_ipo_liger": lambda work, run: _trl_worker(work, run, precompute=False, liger=True),
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
    out = {
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
    out.update({key: clock[key] for key in CUDA_KEYS if key in clock})  # the clock's, on a CUDA device
    return out


CUDA_KEYS = ("device", "peak_cuda_alloc_mb", "peak_cuda_reserved_mb")
"""What the step clock adds on a CUDA device: its name and the process's peak allocated and
reserved CUDA memory (``torch.cuda.max_memory_allocated``/``max_memory_reserved``, whole run)."""


class RunFailed(RuntimeError):
    """A mode's process failed or ran past its time limit; the message ends with its stderr's tail."""


def run_once(
    mode: str, work: Workload, model: Path, data: Path, *, timeout: float | None = None
) -> dict[str, Any]:
    """Run ``mode`` once in a fresh process (nothing else of the benchmark alive) and read its clock.

    Raises:
        RunFailed: the process exited non-zero, wrote no clock, or ran past ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory(prefix=f"bench-{mode}-") as scratch_dir:
        run = Run(model=model, pairs=data / "pairs.jsonl", scratch=Path(scratch_dir))
        command = MODES[mode].command(work, run)
        try:
            result = subprocess.run(
                command,
                env=run_environment(work, run.scratch),
                cwd=run.scratch,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            tail = (error.stderr or b"")[-4000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise RunFailed(f"mode {mode} ran past {timeout:.0f} s:\n{tail}") from None
        if result.returncode != 0 or not run.clock.exists():
            raise RunFailed(f"mode {mode} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        lengths = json.loads((data / "lengths.json").read_text())
        out = summarize_run(mode, work, lengths, json.loads(run.clock.read_text()))
        saved = list((run.scratch / "runs").glob("*/config.yaml"))
        if saved:  # what the run recorded it used (auto resolved)
            import yaml

            out["batching"] = yaml.safe_load(saved[0].read_text())["model"]["batching"]
        return out


def unavailable(mode: str) -> str | None:
    """Why ``mode`` cannot run here (a missing package, no CUDA device), or None when it can."""
    import importlib.util

    missing = [name for name in MODES[mode].needs if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if MODES[mode].cuda:
        import torch

        if not torch.cuda.is_available():  # counts devices; creates no CUDA context in this process
            return "needs a CUDA device"
    return None


def _summaries(
    runs: list[dict[str, Any]], modes: list[str], repeats: int, baselines: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Per mode: medians over rounds, and ratios against the baselines of the same rounds.

    ``vs_<base>`` is the median over rounds of ``mode pairs/s / base pairs/s`` (both runs of that
    round); ``cpu_vs_<base>`` the same with pairs per CPU second; ``rss_vs_<base>`` the median ratio
    of peak RSS, and ``mem_vs_<base>`` of peak allocated CUDA memory where the runs have it.
    ``baselines``: default :data:`BASELINES`.
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
        for key in ("pairs_per_s", "tokens_per_s", "pairs_per_cpu_s", "peak_rss_mb", *CUDA_KEYS[1:]):
            if all(key in r for r in mine):
                summary[key] = round(statistics.median(r[key] for r in mine), 2)
        if "device" in mine[0]:
            summary["device"] = mine[0]["device"]
        summary["steps"] = sum(r["steps"] for r in mine)
        summary["rounds"] = len(mine)
        for base in baselines or BASELINES:
            rounds = [k for k in range(repeats) if (mode, k) in by_round and (base, k) in by_round]
            if not rounds:
                continue
            for prefix, key in (
                ("vs", "pairs_per_s"),
                ("cpu_vs", "pairs_per_cpu_s"),
                ("rss_vs", "peak_rss_mb"),
                ("mem_vs", "peak_cuda_alloc_mb"),
            ):
                both = [(by_round[(mode, k)], by_round[(base, k)]) for k in rounds]
                if not all(key in run and key in base_run for run, base_run in both):
                    continue
                ratios = [run[key] / base_run[key] for run, base_run in both]
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
    parser.add_argument("--run-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-pairs", type=Path, help=argparse.SUPPRESS)
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
    if args.worker:
        import torch

        torch.manual_seed(work.seed)
        WORKERS[args.worker](work, Run(model=args.run_model, pairs=args.run_pairs, scratch=args.scratch))
        return
    model, data = prepare(work, args.cache)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    reasons = {m: unavailable(m) for m in modes}
    for mode, reason in reasons.items():
        if reason:
            print(json.dumps({"kind": "skipped", "mode": mode, "reason": reason}))
    modes = [m for m in modes if not reasons[m]]
    runs = []
    for round_index in range(args.repeats):
        for mode in round_order(modes, round_index):
            try:
                result = run_once(mode, work, model, data)
            except RunFailed as error:
                sys.exit(str(error))
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
