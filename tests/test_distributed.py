"""Several processes on CPU (gloo), through the real CLI: DDP (Lightning's launcher), FSDP (torchrun),
FSDP2 (forked torchrun ranks), a simulated SLURM job, requeue and resume.

Every process is started in its own session and killed with its children when a test ends, and every
wait has a deadline, so a hang fails the test instead of the suite. One thread per process.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipo_lightning.callbacks.slurm import REQUEUE_EXIT_CODE
from ipo_lightning.cli import main
from ipo_lightning.run_folder import WANDB_ID_FILE
from tests.helpers import (
    REPO,
    cli_command,
    fit_config,
    polite_pairs,
    subprocess_env,
    write_config,
    write_jsonl,
)
from tests.ranks import Torchrun, TorchrunRanks, free_port

PAIRS, GLOBAL_BATCH, MAX_STEPS = 16, 4, 8  # 4 optimizer steps per epoch, 2 epochs
DEADLINE_S = 240


def _config(
    tmp_path: Path,
    model_dir: Path,
    *,
    per_rank_batch: int,
    wandb: bool = False,
    pace: bool = False,
    step_checkpoints: bool = False,
    shard_sizes: bool = False,
):
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(PAIRS))
    callbacks = []
    if pace:
        marker = str(tmp_path / "steps.txt")
        callbacks.append({"class_path": "tests.helpers.StepPacer", "init_args": {"marker": marker}})
    if step_checkpoints:  # one checkpoint per epoch's end (4 steps) under <tmp_path>/steps, all kept
        every = {
            "dirpath": str(tmp_path / "steps"),
            "every_n_train_steps": PAIRS // GLOBAL_BATCH,
            "save_top_k": -1,
        }
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": every})
    if shard_sizes:
        callbacks.append({"class_path": "tests.helpers.ShardSizes", "init_args": {"folder": str(tmp_path)}})
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        trainer={
            "max_steps": MAX_STEPS,
            "max_epochs": 2,
            "enable_model_summary": False,
            "callbacks": callbacks,
        },
        model={
            "beta": 0.5,
            # Plain SGD: Adam's normalisation would blow float noise in near-zero gradients up to lr.
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            "warmup_ratio": 0.0,
        },
        data={"max_length": 48, "max_prompt_length": 24, "batch_size": per_rank_batch},
        divergence={"enabled": False},
        wandb={"enabled": wandb},
    )
    del config["trainer"]["devices"]  # each test says how many processes
    return write_config(tmp_path / "config.yaml", config)


def _command(config: Path, *args: str) -> list[str]:
    return cli_command("fit", "--config", str(config), *args)


class Processes:
    """Processes started in their own sessions; ``close`` kills whatever is left, children included."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
        handle = log.open("w")
        process = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        handle.close()
        self.started.append(process)
        return process

    def wait(self, process: subprocess.Popen[str], log: Path, deadline: float) -> int:
        try:
            return process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"process timed out; log tail:\n{log.read_text()[-3000:]}")

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=30)


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Started processes, killed (with their process groups) at the end of the test."""
    tracker = Processes()
    try:
        yield tracker
    finally:
        tracker.close()


def _train_losses(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open() as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf_model" / "model.safetensors")


def _assert_same_losses(actual: list[float], expected: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-4, atol=1e-6)


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The reference run: one process, global batch 4, SGD, 8 steps; returns its run folder. It also
    keeps the checkpoint of step 4 (the end of epoch 0) in ``steps/`` beside ``runs/``.

    It is fitted in this process through the CLI's entry point: the tests compare its numbers, and a
    child would spend most of its time importing.
    """
    tmp_path = tmp_path_factory.mktemp("single")
    config = _config(tmp_path, tiny_model_dir, per_rank_batch=GLOBAL_BATCH, step_checkpoints=True)
    main(["fit", "--config", str(config), "--trainer.devices", "1"])
    return tmp_path / "runs" / "version_0"


@dataclass(frozen=True)
class Job:
    """A finished multi-process fit: its folder (``runs/`` under it), run folder, exit code and combined
    output."""

    folder: Path
    run_dir: Path
    code: int
    log: Path


FSDP2_ARGS = [
    *("--config", str(REPO / "configs" / "strategy" / "fsdp2.yaml")),
    *("--trainer.accelerator", "cpu", "--trainer.devices", "2"),
]
JOBS = {
    "ddp": ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
    "ddp_bad_record": ["--trainer.strategy", "ddp", "--trainer.devices", "2"],
    "fsdp": [
        *("--config", str(REPO / "configs" / "strategy" / "fsdp.yaml")),
        *("--trainer.accelerator", "cpu", "--trainer.devices", "2"),
    ],
}
"""The independent two-process fits (2 ranks x batch 2) of the tests below, by name."""
LAUNCHERS = {"ddp": "lightning", "ddp_bad_record": "lightning", "fsdp": "torchrun", "fsdp2": "forked"}
"""How each job starts, in fresh interpreters as a user starts it: ``lightning``, ``python -m
ipo_lightning fit ... --trainer.devices 2`` (the first process starts the second), or ``torchrun``
(torch's own launcher, ``python -m torch.distributed.run``); or ``forked``, as torchrun starts ranks but
forked from a process that imported the CLI once (tests.ranks)."""


def _torchrun_command(config: Path, args: list[str]) -> list[str]:
    """torchrun starting two ranks of ``python -m ipo_lightning fit`` on this node (run folder
    ``torchrun-0``), its store on a port no other run of the suite is given."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-id=0"]
    launcher.append(f"--master-port={free_port()}")
    return [*launcher, "-m", "ipo_lightning", "fit", "--config", str(config), *args]


@pytest.fixture(scope="module")
def two_process_jobs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> dict[str, Job]:
    """The :data:`JOBS`, started at the same time and run to the end, each in its own folder.

    Independent runs: together they keep both cores busy while each one's second rank starts up
    (imports), which one run alone leaves to one core; the one-process reference fits in this process
    meanwhile. ``ddp_bad_record``'s training file ends with a record that has no rejected reply
    (record 16). Once the reference fit is done, ``fsdp2`` resumes from its step-4 checkpoint under
    FSDP2 and records its ranks' shard sizes (:class:`tests.helpers.ShardSizes`).
    """
    tracker = Processes()
    launched: dict[str, tuple[Path, subprocess.Popen[str], Path]] = {}
    ranks: dict[str, tuple[Path, TorchrunRanks]] = {}

    def start(name: str, args: list[str]) -> None:
        folder = tmp_path_factory.mktemp(name)
        config = _config(
            folder, tiny_model_dir, per_rank_batch=GLOBAL_BATCH // 2, shard_sizes=name == "fsdp2"
        )
        if name == "ddp_bad_record":
            with (folder / "train.jsonl").open("a") as handle:
                handle.write('{"prompt": "hi", "chosen": " ok"}\n')  # record 16: no rejected
        if LAUNCHERS[name] != "forked":
            log = folder / "log.txt"
            command = (
                _command(config, *args) if LAUNCHERS[name] == "lightning" else _torchrun_command(config, args)
            )
            launched[name] = (folder, tracker.start(command, subprocess_env(folder), log), log)
        else:
            run = Torchrun(["fit", "--config", str(config), *args])
            ranks[name] = (folder, TorchrunRanks(run, subprocess_env(folder), folder / "ranks"))

    try:
        for name, args in JOBS.items():
            start(name, args)
        deadline = time.monotonic() + DEADLINE_S * (len(JOBS) + 1)  # each job's own deadline, in turn
        # After every start: the in-process fit sets os.environ entries no child should inherit.
        single = request.getfixturevalue("single_process_run")
        (step_4,) = (single.parents[1] / "steps").glob("*step=4.ckpt")
        start("fsdp2", [*FSDP2_ARGS, "--ckpt_path", str(step_4)])
        run_folders = {"lightning": "version_0", "torchrun": Torchrun([]).folder}
        jobs = {
            name: Job(
                folder,
                folder / "runs" / run_folders[LAUNCHERS[name]],
                tracker.wait(process, log, deadline),
                log,
            )
            for name, (folder, process, log) in launched.items()
        }
        for name, (folder, started) in ranks.items():
            finished = started.wait(max(deadline - time.monotonic(), 1.0))
            started.kill()
            result, log = started.result(), folder / "log.txt"
            log.write_text(result.stdout + result.stderr)
            assert finished, f"{name} timed out; log tail:\n{log.read_text()[-3000:]}"
            run_dir = folder / "runs" / started.run.folder
            jobs[name] = Job(folder, run_dir, result.returncode, log)
        return jobs
    finally:
        tracker.close()
        for _, started in ranks.values():
            started.kill()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(
    tiny_model_dir: Path, two_process_jobs: dict[str, Job], single_process_run: Path
) -> None:
    """2 ranks x batch 2 through the CLI = 1 process x batch 4: loss per step and final weights."""
    job = two_process_jobs["ddp"]
    assert job.code == 0, job.log.read_text()[-4000:]
    runs = sorted((job.folder / "runs").iterdir())
    assert runs == [job.run_dir]  # one folder for both ranks: no version race
    run_dir = job.run_dir

    single_losses, ddp_losses = _train_losses(single_process_run), _train_losses(run_dir)
    assert len(ddp_losses) == MAX_STEPS and ddp_losses[-1] < ddp_losses[0]
    # train/loss is the mean over all pairs of the step on both ranks (torchmetrics sync).
    _assert_same_losses(ddp_losses, single_losses)
    _assert_same_weights(_weights(run_dir), _weights(single_process_run))
    start = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.equal(start["lm_head.weight"], _weights(run_dir)["lm_head.weight"])
    # Rank 0 alone wrote the export, once.
    assert not list(run_dir.glob(".hf_model-*"))


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(
    two_process_jobs: dict[str, Job], single_process_run: Path
) -> None:
    """configs/strategy/fsdp.yaml on 2 CPU processes: sharded policy, reference left out of FSDP; the
    loss curve and the export (gathered to rank 0) equal one process's."""
    job = two_process_jobs["fsdp"]
    assert job.code == 0, job.log.read_text()[-4000:]
    run_dir = job.run_dir
    # The checkpoint holds the full policy in one file (gathered), and no reference.
    (checkpoint,) = (run_dir / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert state["policy.lm_head.weight"].shape == _weights(run_dir)["lm_head.weight"].shape
    assert not any(key.startswith("reference.") for key in state)
    _assert_same_losses(_train_losses(run_dir), _train_losses(single_process_run))
    _assert_same_weights(_weights(run_dir), _weights(single_process_run))


def _checkpoint_state(folder: Path, pattern: str = "*.ckpt") -> dict[str, torch.Tensor]:
    (checkpoint,) = folder.glob(pattern)
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_fsdp2_resumes_one_process_checkpoint_and_trains_as_it_did_with_the_reference_sharded(
    two_process_jobs: dict[str, Job], single_process_run: Path
) -> None:
    """configs/strategy/fsdp2.yaml on 2 CPU processes, resumed from one process's step-4 checkpoint
    (weights, optimizer, loops and random states into the sharded module): policy and reference both
    sharded, each rank holding its half after a step; steps 5-8, the export and the final checkpoint
    (one full file, no reference) equal that process's."""
    job = two_process_jobs["fsdp2"]
    assert job.code == 0, job.log.read_text()[-4000:]
    run_dir = job.run_dir
    ranks = [json.loads((job.folder / f"shards_rank{rank}.json").read_text()) for rank in (0, 1)]
    for name in ("policy", "reference"):
        full = ranks[0][name]["full"]
        assert sum(rank[name]["local"] for rank in ranks) == full, name
        assert all(rank[name]["local"] < 0.6 * full for rank in ranks), name  # about half each
    losses, single = _train_losses(run_dir), _train_losses(single_process_run)
    assert len(losses) == MAX_STEPS // 2
    _assert_same_losses(losses, single[MAX_STEPS // 2 :])
    _assert_same_weights(_weights(run_dir), _weights(single_process_run))
    state = _checkpoint_state(run_dir / "checkpoints")
    assert not any(key.startswith("reference.") for key in state)
    expected = _checkpoint_state(single_process_run.parents[1] / "steps", f"*step={MAX_STEPS}.ckpt")
    assert state.keys() == expected.keys()
    _assert_same_weights(state, expected)


@pytest.mark.slow
def test_ddp_bad_record_stops_every_rank_with_one_line(two_process_jobs: dict[str, Job]) -> None:
    """A bad record under DDP: every rank stops with the error (none waits at a barrier forever)."""
    job = two_process_jobs["ddp_bad_record"]
    log = job.log.read_text()
    assert job.code == 2, log[-4000:]
    errors = {line for line in log.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "record 16" in errors.pop() and "Traceback" not in log


def _slurm_env(tmp_path: Path, rank: int, port: int, fake_bin: Path) -> dict[str, str]:
    return subprocess_env(
        tmp_path,
        SLURM_NTASKS="2",
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODEID="0",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_JOB_NAME="ipo-test",  # not "bash": Lightning treats that as an interactive session
        SLURM_JOB_ID="4242",
        SLURM_NODELIST="localhost",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PATH=f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    )


def _fake_scontrol(tmp_path: Path) -> tuple[Path, Path]:
    """A ``scontrol`` on PATH that records its arguments (SLURM itself is absent here)."""
    fake_bin, record = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    fake_bin.mkdir()
    script = fake_bin / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\n')
    script.chmod(0o755)
    return fake_bin, record


def _launch_slurm_job(tmp_path: Path, config: Path, processes: Processes, fake_bin: Path, attempt: int):
    port = free_port()
    args = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.num_nodes", "1"]
    launched = []
    for rank in (0, 1):
        log = tmp_path / f"attempt{attempt}_rank{rank}.txt"
        env = _slurm_env(tmp_path, rank, port, fake_bin)
        launched.append((processes.start(_command(config, *args), env, log), log))
    return launched


@pytest.mark.slow
def test_slurm_job_requeues_on_signal_and_resumes(
    tmp_path: Path, tiny_model_dir: Path, single_process_run: Path, processes: Processes
) -> None:
    """Two hand-started SLURM tasks: SIGUSR1 mid-run -> checkpoint + requeue; relaunch resumes to the end."""
    fake_bin, record = _fake_scontrol(tmp_path)
    config = _config(tmp_path, tiny_model_dir, per_rank_batch=GLOBAL_BATCH // 2, wandb=True, pace=True)
    marker = tmp_path / "steps.txt"
    deadline = time.monotonic() + DEADLINE_S

    first = _launch_slurm_job(tmp_path, config, processes, fake_bin, attempt=1)
    while not (marker.exists() and len(marker.read_text().split()) >= 2):
        assert all(p.poll() is None for p, _ in first), first[0][1].read_text()[-3000:]
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.2)
    # SLURM signals every task; signalling one is enough (the ranks agree at the next step) and harder.
    first[1][0].send_signal(signal.SIGUSR1)
    for process, log in first:
        assert processes.wait(process, log, deadline) == REQUEUE_EXIT_CODE, log.read_text()[-4000:]
    run_dir = tmp_path / "runs" / "slurm-4242"  # from the job id, the same in every task and after requeue
    # Lightning took the world from SLURM's variables: two hand-started tasks, one world of size 2.
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in first[1][1].read_text()
    assert record.read_text().split() == ["requeue", "4242"]  # rank 0 alone asked SLURM to requeue
    (checkpoint,) = run_dir.glob("hpc_ckpt_*.ckpt")
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < stopped_at < MAX_STEPS
    assert not (run_dir / "hf_model").exists()  # an interrupted run exports nothing
    wandb_id = (run_dir / WANDB_ID_FILE).read_text().strip()

    second = _launch_slurm_job(tmp_path, config, processes, fake_bin, attempt=2)
    for process, log in second:
        assert processes.wait(process, log, deadline) == 0, log.read_text()[-4000:]
    assert f"Resuming from {checkpoint}" in second[0][1].read_text()
    steps = [int(step) for step in marker.read_text().split()]
    assert steps[-1] == MAX_STEPS and stopped_at + 1 in steps[steps.index(stopped_at) + 1 :]
    # Same W&B run continued: both launches' offline runs carry the id kept in the run folder.
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == wandb_id
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(run.name.endswith(f"-{wandb_id}") for run in offline_runs)
    # Interrupted at world size 2, resumed, trained to the end: the weights of one uninterrupted process.
    _assert_same_weights(_weights(run_dir), _weights(single_process_run))


def test_sbatch_script_launches_one_task_per_gpu_with_requeue(tmp_path: Path) -> None:
    """The sbatch template's header asks for the requeue signal, and its srun line sets the world last."""
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=SIGUSR1@300" in header and "#SBATCH --requeue" in header
    fake_bin, calls = tmp_path / "bin", tmp_path / "srun_args.txt"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{calls}"\n')
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho node7\n")  # `scontrol show hostnames`
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    env = subprocess_env(
        tmp_path,
        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="777",
        SLURM_JOB_NODELIST="node[7-8]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="4",
        SLURM_SUBMIT_DIR=str(REPO),
        PYTHON="python3",
    )
    args = ["--config", "configs/quickstart.yaml", "--config", "configs/strategy/ddp.yaml"]
    result = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "master node7:15777" in result.stdout
    assert calls.read_text().split() == [
        "--kill-on-bad-exit=1", "python3", "-m", "ipo_lightning", "fit", *args,
        "--trainer.num_nodes", "2", "--trainer.devices", "4",
    ]  # fmt: skip
