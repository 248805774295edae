"""Builders shared by tests: preference pairs with an obvious, learnable preference, fit configs, and
the environment and command line of a child ``python -m ipo_lightning`` process."""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from tests.ranks import Torchrun, TorchrunRanks, exit_code

REPO = Path(__file__).resolve().parents[1]
"""The repository root: configs/, scripts/ and benchmarks/ are read from here, and children import it."""
# Set by launchers (torchrun, SLURM, Lightning's DDP); a child inheriting them would join another job.
_LAUNCH_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")

GOOD = ["thank you", "here is a clear answer", "please", "happy to help"]
BAD = ["no", "figure it out yourself", "stupid question", "go away"]
TOPICS = ["the sea", "bread", "the sky", "a fox", "France", "a poem"]


def polite_pairs(count: int, offset: int = 0) -> list[dict[str, str]]:
    """``count`` plain pairs: the chosen reply is polite, the rejected one rude (deterministic)."""
    records = []
    for i in range(offset, offset + count):
        topic = TOPICS[i % len(TOPICS)]
        records.append(
            {
                "prompt": f"Human: tell me about {topic}. Assistant:",
                "chosen": f" {GOOD[i % len(GOOD)]}, {topic} is lovely.",
                "rejected": f" {BAD[i % len(BAD)]}, {topic}.",
            }
        )
    return records


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """Write ``records`` as JSON lines and return ``path``."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


class StepPacer(Callback):
    """Test callback for multi-process runs: after each optimizer step, record the step and sleep.

    The sleep widens the window in which a test can signal a running job; the marker file (one line
    per step, from rank 0) tells the test how far training has got. It draws no random numbers.

    Args:
        marker: file that rank 0 appends the global step to after each batch.
        seconds: sleep after each batch.
    """

    def __init__(self, marker: str, seconds: float = 0.3) -> None:
        self.marker = marker
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.is_global_zero:
            with open(self.marker, "a") as handle:
                handle.write(f"{trainer.global_step}\n")
        time.sleep(self.seconds)


class ShardSizes(Callback):
    """Test callback: each rank writes how many elements of each top-level submodule's parameters it
    holds (a sharded parameter counts its local shard) to ``<folder>/shards_rank<rank>.json`` after
    the fit's first training step (after a forward, a backward and an optimizer step, so a unit FSDP
    kept gathered counts whole), beside each submodule's full element count. It draws no random numbers.

    Args:
        folder: where the files go.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.written = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.written:
            return
        self.written = True
        from torch.distributed.tensor import DTensor

        sizes: dict[str, dict[str, int]] = {}
        for name, child in pl_module.named_children():
            params = list(child.parameters())
            if params:
                local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
                sizes[name] = {"local": local, "full": sum(p.numel() for p in params)}
        path = Path(self.folder) / f"shards_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(sizes))


class SignalAtStep(Callback):
    """Test callback: send ``signal_name`` to this very process as optimizer step ``step`` starts.

    Stands in for SLURM's ``--signal`` at a known step, so a requeue test needs no timing: the
    requeue callback under test sees its flag at the end of that step. A resumed run starts past
    ``step`` and is not signalled again. It draws no random numbers.

    Args:
        step: ``trainer.global_step`` at the start of the batch that is signalled.
        signal_name: the signal to send.
    """

    def __init__(self, step: int, signal_name: str = "SIGUSR1") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def quiet_trainer(root: Path, max_steps: int = 1, **kwargs: Any) -> L.Trainer:
    """A CPU trainer without logger, progress bar, summary, checkpoints or sanity check."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
    }
    options.update(kwargs)
    return L.Trainer(**options)


class ScaleLogits(Callback):
    """Test callback: multiply the policy's logits by ``factor`` in the given optimizer steps.

    ``inf`` makes the loss and every gradient of those steps NaN, the way an overflow does; a large
    finite factor makes the loss jump. It acts through a forward hook on the real output layer, only on
    the processes in ``ranks`` (all when None).

    Args:
        steps: optimizer steps (``trainer.global_step`` when the step starts) to act in.
        factor: what the logits are multiplied by.
        ranks: global ranks to act on; None: every rank.
    """

    def __init__(
        self, steps: list[int], factor: float = float("inf"), ranks: list[int] | None = None
    ) -> None:
        self.steps = set(steps)
        self.factor = factor
        self.ranks = ranks
        self._handle: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        acting = self.ranks is None or trainer.global_rank in self.ranks
        if acting and trainer.global_step in self.steps and self._handle is None:
            head = pl_module.policy.get_output_embeddings()
            self._handle = head.register_forward_hook(lambda module, inputs, output: output * self.factor)

    def on_train_batch_end(self, *args: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a child ``python -m ipo_lightning`` run: this checkout importable, W&B offline,
    one thread, caches under ``tmp_path``, and no launcher variables inherited from the test process.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "TORCHELASTIC_", "PL_")) and key not in _LAUNCH_VARS
    }
    # An earlier in-process W&B run leaves its service's address here; a child would share that
    # service, which still counts the first launch's run as active ("run ID ... is in use").
    env.pop("WANDB_SERVICE", None)
    env.update(
        WANDB_MODE="offline",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf_cache"),
        WANDB_DIR=str(tmp_path / "wandb"),
    )
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    """``python -m ipo_lightning ARGS`` with this interpreter, as a user runs it."""
    return [sys.executable, "-m", "ipo_lightning", *args]


def run_cli(
    tmp_path: Path, *args: str, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ipo_lightning ARGS`` to the end in :func:`subprocess_env` (plus ``env``), output
    captured.

    The child leads its own process group, so on timeout the whole group dies (DDP's second rank is
    a child of the first) and the test fails instead of hanging.
    """
    (result,) = run_clis(tmp_path, list(args), timeout=timeout, env=env)
    return result


class _CliChild:
    """One ``python -m ipo_lightning ARGS`` child of :func:`run_clis`, leading its own process group."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        self._output, self._errors = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(
            cli_command(*args),
            env=dict(env),
            stdout=self._output,
            stderr=self._errors,
            text=True,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the child to end; False if it is still running."""
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """Kill the child's process group (DDP's second rank is a child of the first)."""
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def result(self) -> subprocess.CompletedProcess[str]:
        """Exit code, stdout and stderr; closes the output files."""
        streams = []
        for handle in (self._output, self._errors):
            handle.seek(0)
            streams.append(handle.read())
            handle.close()
        return subprocess.CompletedProcess(self._process.args, self._process.returncode, *streams)


def run_clis(
    tmp_path: Path,
    *commands: Sequence[str] | Torchrun,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    envs: Sequence[Mapping[str, str]] | None = None,
    meanwhile: Callable[[], object] | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent ``python -m ipo_lightning ARGS`` commands at the same time, each as
    :func:`run_cli` runs one (``env`` added to every child's, ``envs[i]`` to command i's); their
    results in the order given. A :class:`tests.ranks.Torchrun` command runs as torchrun runs it, its
    ranks forked from a process that imported the CLI once; its result holds every rank's output.

    The test process only waits on its children, so a second child uses a core it would leave idle.
    Output goes to files rather than pipes: a child never blocks on a full pipe while another is waited on.

    ``meanwhile`` is called in this process once every child has started (so nothing it sets in
    ``os.environ`` reaches them), before they are waited on: a one-process fit to compare with them
    runs there without a child's start-up. Should it raise, the children are killed.
    """
    started: list[tuple[str, _CliChild | TorchrunRanks]] = []
    try:
        for index, command in enumerate(commands):
            child_env = subprocess_env(tmp_path, **(env or {}), **(envs[index] if envs is not None else {}))
            if isinstance(command, Torchrun):
                output = Path(tempfile.mkdtemp(prefix="ranks-", dir=tmp_path))
                started.append((" ".join(command.command_line()), TorchrunRanks(command, child_env, output)))
            else:
                started.append((" ".join(command), _CliChild(command, child_env)))
        if meanwhile is not None:
            meanwhile()
        deadline = time.monotonic() + timeout
        late = [name for name, child in started if not child.wait(max(deadline - time.monotonic(), 0.1))]
    finally:
        for _, child in started:
            child.kill()
    results = [child.result() for _, child in started]
    if late:
        tails = [
            f"{name}:\n{(result.stdout + result.stderr)[-2000:]}"
            for (name, _), result in zip(started, results, strict=True)
            if name in late
        ]
        pytest.fail(f"did not finish within {timeout} s: " + "\n".join(tails))
    return results


_IN_PROCESS_CLI = threading.Lock()
"""Held while the CLI runs in this process: its output is captured by swapping the process-wide
``sys.stdout``/``sys.stderr``, so two runs from two threads would mix their output."""


def run_cli_in_process(args: Sequence[str], capture: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ipo_lightning ARGS`` in this process (``ipo_lightning.cli.main``, what
    ``__main__`` calls): its exit code, stdout and stderr, as :func:`subprocess.run` with
    ``capture_output=True, text=True`` gives them for the child process.

    ``capture=False``: the output goes to this process's stdout and stderr, and the result holds
    neither, as :func:`subprocess.run` without ``capture_output`` gives them.
    """
    from ipo_lightning.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _IN_PROCESS_CLI, contextlib.ExitStack() as redirect:
        if capture:
            redirect.enter_context(contextlib.redirect_stdout(out))
            redirect.enter_context(contextlib.redirect_stderr(err))
        try:
            main(list(args))
        except SystemExit as exit_info:
            code = exit_code(exit_info)  # inside the redirect: a message goes to the captured stderr
    if not capture:
        return subprocess.CompletedProcess(cli_command(*args), code)
    return subprocess.CompletedProcess(cli_command(*args), code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def cli_runs_in_process(fits: bool = False) -> Iterator[list[list[str]]]:
    """While open, ``subprocess.run(cli_command(ARGS), capture_output=True, text=True[, check=...])``
    from any code runs the CLI in this process (:func:`run_cli_in_process`) instead of starting a
    child; every other ``subprocess.run`` call is left alone. Yields the command lines it ran so.

    For tests of code that parses configs in child processes (``compare``'s member checks) whose
    subject is the configs, not the processes: each child start costs seconds of imports.

    ``fits=True``: ``subprocess.run(cli_command(ARGS)[, check=...])`` without captured output
    (``compare``'s fits one after another) runs in this process too, its output going to this one's.
    """
    real_run = subprocess.run
    prefix = cli_command()
    ran: list[list[str]] = []

    def run(command: Any, *args: Any, **kwargs: Any) -> Any:
        captured = kwargs.get("capture_output") is True and kwargs.get("text") is True
        uncaptured = fits and not {"capture_output", "text"} & set(kwargs)
        if (
            not args
            and (captured or uncaptured)
            and set(kwargs) <= {"capture_output", "text", "check"}
            and isinstance(command, (list, tuple))
            and list(command[: len(prefix)]) == prefix
        ):
            ran.append(list(command))
            result = run_cli_in_process(command[len(prefix) :], capture=captured)
            if kwargs.get("check"):
                result.check_returncode()
            return result
        return real_run(command, *args, **kwargs)

    subprocess.run = run  # type: ignore[assignment]
    try:
        yield ran
    finally:
        subprocess.run = real_run  # type: ignore[assignment]


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings key by key, everything else replaced."""
    result = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def fit_config(
    tmp_path: Path, model_dir: Path, train: Path, val: Mapping[str, Path] | None = None, **sections: Any
) -> dict[str, Any]:
    """A small CPU fit config of the tiny model on ``train`` (and named ``val`` sets), seed 0, runs
    under ``tmp_path/runs``; each keyword is a config section merged over these defaults."""
    data: dict[str, Any] = {"train": {"path": str(train)}, "max_length": 64, "max_prompt_length": 32}
    if val:
        data["val"] = {name: {"path": str(path)} for name, path in val.items()}
    base = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(tmp_path / "runs"),
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
        },
        "model": {"model_name_or_path": str(model_dir)},
        "data": data,
    }
    return merged(base, sections)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI in this process as ``python -m ipo_lightning ARGS``: its exit code and stderr."""
    from ipo_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0), capsys.readouterr().err


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` as YAML to ``path`` and return ``path``."""
    path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    return path


def save_tiny_reward_model(
    folder: Path, tokenizer_dir: Path, *, num_labels: int = 1, seed: int = 0, architecture: str = "llama"
) -> Path:
    """Save a tiny sequence-classification model (random weights from ``seed``, ``pad_token_id`` set)
    with the tokenizer of ``tokenizer_dir`` (the tiny BPE tokenizer, with a ChatML chat template).

    ``architecture``: ``llama`` (rotary positions), ``gpt2`` (learned absolute positions), or the
    encoders ``bert`` (positions from 0, first-token pooling) and ``roberta`` (positions from
    ``padding_idx + 1``, first-token pooling).
    """
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    shared = {"vocab_size": len(tokenizer), "num_labels": num_labels, "pad_token_id": tokenizer.pad_token_id}
    # A wide initialisation: with the default 0.02 every text of an encoder scores about the same.
    encoder = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    encoder["initializer_range"] = 0.5
    if architecture == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=2, n_head=2, **shared))
    elif architecture == "bert":
        model = BertForSequenceClassification(BertConfig(**encoder, **shared))
    elif architecture == "roberta":
        # Positions run from padding_idx + 1, so the table needs that many extra rows.
        positions = 256 + tokenizer.pad_token_id + 1
        model = RobertaForSequenceClassification(
            RobertaConfig(**encoder, max_position_embeddings=positions, **shared)
        )
    else:
        config = LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, **shared
        )
        model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        # Scores of order 1, so float noise and real differences are apart.
        head = [module for module in model.modules() if isinstance(module, torch.nn.Linear)][-1]
        head.weight.mul_(25.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a CSV file (``metrics.csv``), as ``csv.DictReader`` reads them."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def without_timings(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """``metrics.csv`` rows without their ``perf/`` values, which measure the machine, not the run."""
    return [{name: value for name, value in row.items() if not name.startswith("perf/")} for row in rows]


def logged_values(metrics_csv: Path, prefixes: tuple[str, ...]) -> dict[tuple[int, str], float]:
    """Every value ``metrics_csv`` holds for a metric starting with one of ``prefixes``, by (step, name)."""
    values = {}
    with metrics_csv.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if value and name.startswith(prefixes):
                    values[int(row["step"]), name] = float(value)
    return values


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as module ``name`` (benchmarks are scripts, not a package),
    taken out of ``sys.modules`` again on exit."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
