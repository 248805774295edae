"""Training throughput per batching/reference mode, against an SFT step and TRL's DPOTrainer (IPO loss).

Every mode trains the same tiny Llama-architecture model (random init, float32, built from a config
and a byte-level BPE tokenizer trained offline) on the same synthetic token-id pairs, in the same
order, with AdamW: ipo_lightning modes through a real ``lightning.Trainer`` fitting
``PreferenceModule`` (forward, backward, optimizer step and per-step metrics), TRL through its own
``DPOTrainer.train()``. A step is timed from the trainer's batch-start hook to its batch-end hook
(the collated batch in hand, the optimizer step done); the first ``--warmup`` steps are dropped.

Each mode runs in its own fresh worker process (so ``peak_rss_mb``, the process's peak resident
memory, is per mode; it includes the Python imports, which are larger for TRL). The workers of a
round start together, load and precompute, then run in lockstep: step k of every mode, one at a time,
on the same batch, before any step k+1 (:class:`StepGate`), so load from other processes hits every
mode alike. Ratios (``vs_<base>``) are medians over rounds and steps of step-time ratios on the same
batch; ``cpu_vs_<base>`` the same with process CPU seconds. Output: one JSON line per mode and round
(``"kind": "run"``), then one per mode (``"kind": "summary"``) with median ``pairs_per_s``,
``tokens_per_s`` (real tokens of the 2B prompt+completion sequences, the same count in every mode),
``peak_rss_mb`` and the ratios.

    python benchmarks/throughput.py                                  # every mode, default workload
    python benchmarks/throughput.py --modes padded,prefix_shared,trl_ipo --repeats 3 --steps 10

Modes are a registry (:data:`MODES`): add one with :func:`register`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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
    attn: str = "sdpa"
    beta: float = 0.1
    seed: int = 0

    def key(self) -> str:
        """A short hash of what the prepared model and pairs depend on (the cache folder's name)."""
        data = {k: getattr(self, k) for k in ("hidden", "layers", "heads", "vocab", "prompt_max")}
        data.update(completion_max=self.completion_max, jitter=self.jitter, seed=self.seed)
        data.update(pairs=self.batch_size * (self.warmup + self.steps))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------- model and data

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def _corpus(seed: int, sentences: int = 20000) -> list[str]:
    """Pseudo-words from syllables: enough distinct merges for a several-thousand-token BPE vocabulary."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(6000)]
    return [" ".join(rng.choices(words, k=rng.randint(8, 24))) + "." for _ in range(sentences)]


def prepare(work: Workload, root: Path) -> Path:
    """Save the model, tokenizer and pairs (token ids) under ``root/<key>`` once; return that folder."""
    from transformers import AutoTokenizer

    from ipo_lightning.tiny import save_tiny_model

    folder = root / work.key()
    if (folder / "pairs.json").exists():
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
    stream = [tid for text in corpus[:4000] for tid in tokenizer(text, add_special_tokens=False)["input_ids"]]

    def take(longest: int, eos: bool) -> list[int]:
        # Lengths uniform in [(1 - jitter) * longest, longest]; completions end with EOS, as in training.
        length = rng.randint(max(1, round(longest * (1 - work.jitter))), longest)
        start = rng.randrange(len(stream) - length)
        ids = stream[start : start + length]
        return ids[:-1] + [tokenizer.eos_token_id] if eos else ids

    pairs = [
        {
            "prompt_ids": take(work.prompt_max, eos=False),
            "chosen_ids": take(work.completion_max, eos=True),
            "rejected_ids": take(work.completion_max, eos=True),
        }
        for _ in range(work.batch_size * (work.warmup + work.steps))
    ]
    (folder / "pairs.json").write_text(json.dumps(pairs))
    return folder


def _load_pairs(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "pairs.json").read_text())


def _real_tokens(pairs: list[dict[str, Any]]) -> int:
    """Tokens of the 2B prompt+completion sequences of these pairs (no padding, prompt counted twice)."""
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


# ------------------------------------------------------------------------------------ the modes


class StepGate:
    """Times each training step of this process and, in lockstep, runs it only when the driver says so.

    Lockstep: before a step the worker prints ``@@ready`` and waits for a line on stdin; after it,
    it prints ``@@done``; after its last step it waits once more, so no worker tears down while
    another is being timed. The driver thus runs one step of one mode at a time, every mode's step
    k on the same batch, interleaved step by step: load from other processes hits all modes alike.
    """

    def __init__(self, lockstep: bool = False, total_steps: int = 0) -> None:
        self.lockstep = lockstep
        self.total_steps = total_steps
        self.seconds: list[tuple[float, float]] = []
        self.start = (0.0, 0.0)

    def begin(self) -> None:
        """Called by the trainer's batch-start hook (the collated batch in hand)."""
        if self.lockstep:
            print("@@ready", flush=True)
            sys.stdin.readline()
        self.start = (time.perf_counter(), time.process_time())

    def end(self) -> None:
        """Called by the trainer's batch-end hook (the optimizer step done)."""
        self.seconds.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))
        if self.lockstep:
            print("@@done", flush=True)
            if len(self.seconds) == self.total_steps:
                sys.stdin.readline()


GATE = StepGate()
"""This process's step gate (one training run per worker process)."""


@dataclass(frozen=True)
class Mode:
    """A way of training: ``run(work, folder)`` trains and returns ``(wall, cpu)`` seconds per timed step."""

    name: str
    description: str
    run: Callable[[Workload, Path], list[tuple[float, float]]]
    needs: str | None = None
    """An optional package the mode needs; the mode is skipped when it is missing."""


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add ``mode`` to the registry (the lead adds ``lora`` and reference strategies this way)."""
    MODES[mode.name] = mode
    return mode


def _lightning_steps(
    work: Workload, folder: Path, *, batching: str, precompute: bool = False, sft: bool = False
) -> list[tuple[float, float]]:
    """Fit ``PreferenceModule`` (or the SFT stand-in) with a real Trainer; seconds per timed step."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from ipo_lightning.batching import batch_scores
    from ipo_lightning.data.collator import PairwiseCollator
    from ipo_lightning.module import PreferenceModule

    class SFTModule(PreferenceModule):
        """The policy's step alone on the same chosen+rejected tokens: the limit with a cached reference."""

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            scores = batch_scores(self.policy, *rows, batching=self.hparams.batching)
            return -scores.token_logps.mean()

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            pass  # no preference metrics to log

    class InBatchReferenceModule(PreferenceModule):
        """``model.reference: precomputed`` on data that already carries the reference values.

        The product's precompute pass needs a PreferenceDataModule (text data); the benchmark's data
        is token ids, so the same sums and counts are computed below and the pass is skipped.
        Training steps are the product's own.
        """

        def setup(self, stage: str) -> None:
            self.uses_soft_labels = False

    class StepTimer(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            GATE.begin()

        def on_train_batch_end(self, *args: Any) -> None:
            GATE.end()

    pairs = _load_pairs(folder)
    model_dir = str(folder / "model")
    module_class = SFTModule if sft else (InBatchReferenceModule if precompute else PreferenceModule)
    module = module_class(
        model_dir,
        loss_type="ipo",
        beta=work.beta,
        optimizer=lambda params: torch.optim.AdamW(params, lr=work.lr),
        lr_schedule="constant",
        warmup_steps=0,
        attn_implementation=work.attn,
        batching=batching,
        reference="precomputed" if precompute else None,
    )
    pad_id = int(module.model_config.pad_token_id)
    collate = PairwiseCollator(pad_token_id=pad_id)
    if precompute:
        # Reference sums and token counts computed once before training, carried in the batch under
        # the keys the product's precompute pass writes; the reference model is freed before training.
        from ipo_lightning.modeling import load_causal_lm
        from ipo_lightning.reference import PRECOMPUTED_KEYS

        reference = load_causal_lm(model_dir, attn_implementation=work.attn)
        for start in range(0, len(pairs), work.batch_size):
            chunk = pairs[start : start + work.batch_size]
            batch = collate(chunk)
            rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            with torch.no_grad():
                scores = batch_scores(reference, *rows, batching=batching)
            chosen_sum, chosen_count, rejected_sum, rejected_count = PRECOMPUTED_KEYS
            for i, pair in enumerate(chunk):
                pair[chosen_sum], pair[chosen_count] = float(scores.sums[i]), float(scores.counts[i])
                j = len(chunk) + i
                pair[rejected_sum], pair[rejected_count] = float(scores.sums[j]), float(scores.counts[j])
        del reference
    timer = StepTimer()  # times the steps through GATE
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=work.warmup + work.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = DataLoader(pairs, batch_size=work.batch_size, shuffle=False, collate_fn=collate)
    trainer.fit(module, train_dataloaders=loader)
    return GATE.seconds[work.warmup :]


def _trl_steps(work: Workload, folder: Path, *, precompute: bool) -> list[tuple[float, float]]:
    """TRL ``DPOTrainer(loss_type="ipo")`` on the same token ids, order and optimizer."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class SameDataTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
            return dataset  # already the token ids every mode trains on (completions end with EOS)

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)  # the same batches, in the same order

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            GATE.begin()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            GATE.end()

    model_dir = folder / "model"

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=work.attn
        )

    # An explicit frozen reference: without one TRL reloads the model by name from the hub. With its
    # precompute option TRL scores the data with the initial policy and keeps no reference.
    reference = None if precompute else load().eval().requires_grad_(False)
    timer = StepTimer()  # times the steps through GATE
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(
            output_dir=output_dir,
            loss_type=["ipo"],
            beta=work.beta,
            per_device_train_batch_size=work.batch_size,
            learning_rate=work.lr,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            max_steps=work.warmup + work.steps,
            precompute_ref_log_probs=precompute,
            # TRL's config defaults to bf16 autocast and gradient checkpointing; the workload is float32
            # without checkpointing, as in every other mode.
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            save_strategy="no",
            report_to=[],
            logging_steps=10**6,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=work.seed,
        )
        trainer = SameDataTrainer(
            model=load(),
            ref_model=reference,
            args=config,
            train_dataset=Dataset.from_list(_load_pairs(folder)),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            callbacks=[timer],
        )
        trainer.train()
    return GATE.seconds[work.warmup :]


for _batching in ("padded", "padding_free", "prefix_shared"):
    register(
        Mode(
            _batching,
            f"PreferenceModule, frozen reference, model.batching={_batching}",
            lambda work, folder, b=_batching: _lightning_steps(work, folder, batching=b),
        )
    )
register(
    Mode(
        "sft",
        "SFT step on the same rows (padded), no reference",
        lambda w, f: _lightning_steps(w, f, batching="padded", sft=True),
    )
)
register(
    Mode(
        "precomputed",
        "PreferenceModule, padded, model.reference=precomputed (values in the batch)",
        lambda w, f: _lightning_steps(w, f, batching="padded", precompute=True),
    )
)
register(
    Mode(
        "precomputed_prefix_shared",
        "PreferenceModule, prefix_shared, model.reference=precomputed (values in the batch)",
        lambda w, f: _lightning_steps(w, f, batching="prefix_shared", precompute=True),
    )
)
register(
    Mode(
        "trl_ipo",
        "TRL DPOTrainer(loss_type=ipo), frozen ref_model",
        lambda w, f: _trl_steps(w, f, precompute=False),
        needs="trl",
    )
)
register(
    Mode(
        "trl_ipo_precompute",
        "TRL DPOTrainer(loss_type=ipo), precompute_ref_log_probs=True",
        lambda w, f: _trl_steps(w, f, precompute=True),
        needs="trl",
    )
)


# ------------------------------------------------------------------------------------ driver


def _worker(mode: str, work: Workload, folder: Path, *, lockstep: bool) -> dict[str, Any]:
    """Run one mode in this (fresh) process and return its numbers."""
    import torch

    global GATE
    GATE = StepGate(lockstep=lockstep, total_steps=work.warmup + work.steps)
    torch.set_num_threads(work.threads)
    torch.manual_seed(work.seed)
    seconds = MODES[mode].run(work, folder)
    pairs = _load_pairs(folder)
    timed = pairs[work.batch_size * work.warmup :]
    wall = sum(w for w, _ in seconds)
    cpu = sum(c for _, c in seconds)
    return {
        "mode": mode,
        "pairs_per_s": len(timed) / wall,
        "tokens_per_s": _real_tokens(timed) / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "steps": len(seconds),
        # CPU seconds of this process (all its threads): what other processes' load changes least.
        "pairs_per_cpu_s": len(timed) / cpu,
        "step_wall_s": [round(w, 4) for w, _ in seconds],
        "step_cpu_s": [round(c, 4) for _, c in seconds],
    }


def _lockstep_round(modes: list[str], work: Workload, cache: Path) -> list[dict[str, Any]]:
    """Start one worker per mode, then run step k of every mode in turn (see :class:`StepGate`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS=str(work.threads), TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    flags = [f"--{f.name.replace('_', '-')}={getattr(work, f.name)}" for f in dataclasses.fields(Workload)]
    logs = {mode: tempfile.TemporaryFile(mode="w+") for mode in modes}
    procs = {
        mode: subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, "--lockstep", "--cache", str(cache), *flags],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=logs[mode],
            text=True,
        )
        for mode in modes
    }

    def expect(mode: str, tag: str) -> str:
        for line in procs[mode].stdout:  # other output (TRL prints its metrics) is skipped
            if line.startswith(tag):
                return line[len(tag) :].strip()
        logs[mode].seek(0)
        for other in procs.values():
            other.kill()
        sys.exit(f"mode {mode} failed:\n{logs[mode].read()[-4000:]}")

    def go(mode: str) -> None:
        procs[mode].stdin.write("go\n")
        procs[mode].stdin.flush()

    for mode in modes:  # every worker has loaded its model (and precomputed what it precomputes)
        expect(mode, "@@ready")
    for step in range(work.warmup + work.steps):
        shift = step % len(modes)  # who goes first rotates
        for mode in modes[shift:] + modes[:shift]:
            if step:
                expect(mode, "@@ready")
            go(mode)
            expect(mode, "@@done")
    results = []
    for mode in modes:  # only now may the workers tear down
        go(mode)
        results.append(json.loads(expect(mode, "@@result ")))
        procs[mode].wait()
    return results


def _available(mode: str) -> bool:
    needs = MODES[mode].needs
    if needs is None:
        return True
    import importlib.util

    return importlib.util.find_spec(needs) is not None


def _summaries(runs: list[dict[str, Any]], modes: list[str], repeats: int) -> list[dict[str, Any]]:
    """Per mode: medians over rounds, and ratios against baselines run beside it.

    ``vs_<base>`` is the median over rounds and timed steps of ``base step time / mode step time``
    for the same batch, run back to back (pairs/s ratio); ``cpu_vs_<base>`` the same with the
    processes' CPU seconds; ``rss_vs_<base>`` the median ratio of peak RSS.
    """
    by_round = {(r["mode"], r["round"]): r for r in runs}
    out = []
    for mode in modes:
        mine = [by_round[(mode, k)] for k in range(repeats) if (mode, k) in by_round]
        summary: dict[str, Any] = {"kind": "summary", "mode": mode, "description": MODES[mode].description}
        for key in ("pairs_per_s", "tokens_per_s", "pairs_per_cpu_s", "peak_rss_mb"):
            summary[key] = round(statistics.median(r[key] for r in mine), 2)
        summary["steps"] = sum(r["steps"] for r in mine)
        for base in ("sft", "padded", "trl_ipo", "trl_ipo_precompute"):
            rounds = [k for k in range(repeats) if (mode, k) in by_round and (base, k) in by_round]
            if base not in modes or not rounds:
                continue
            for prefix, key in (("vs", "step_wall_s"), ("cpu_vs", "step_cpu_s")):
                ratios = [
                    theirs / mine
                    for k in rounds
                    for mine, theirs in zip(by_round[(mode, k)][key], by_round[(base, k)][key], strict=True)
                ]
                summary[f"{prefix}_{base}"] = round(statistics.median(ratios), 3)
            rss = [by_round[(mode, k)]["peak_rss_mb"] / by_round[(base, k)]["peak_rss_mb"] for k in rounds]
            summary[f"rss_vs_{base}"] = round(statistics.median(rss), 3)
        out.append(summary)
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse flags, prepare the workload once, run the modes round-robin in subprocesses, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(Workload):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, each with fresh worker processes")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ipo_lightning_bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
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
    folder = prepare(work, args.cache)
    if args.worker:
        print(
            "@@result " + json.dumps(_worker(args.worker, work, folder, lockstep=args.lockstep)), flush=True
        )
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
        for result in _lockstep_round(modes, work, args.cache):
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
