"""Exact resume: stop at any optimizer step, resume from the checkpoint, get bitwise the same weights."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from ipo_lightning.checkpoint_io import AtomicCheckpointIO
from ipo_lightning.cli import main
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.sampler import ResumableDistributedSampler, epoch_permutation
from ipo_lightning.errors import ConfigError
from ipo_lightning.metrics_history import RESUME_POINTS_FILE, HistoryCSVLogger, read_resume_points
from ipo_lightning.module import PreferenceModule
from ipo_lightning.resume import RNGStateCheckpoint, checkpoint_problem, find_resume_checkpoint
from ipo_lightning.tiny import save_tiny_model
from tests.conftest import CORPUS
from tests.helpers import (
    cli_command,
    csv_rows,
    polite_pairs,
    quiet_trainer,
    run_cli_in_process,
    subprocess_env,
    without_timings,
    write_config,
    write_jsonl,
)

PAIRS, BATCH, EPOCHS = 12, 4, 2  # 3 batches per epoch, 6 optimizer steps


class StopAtStep(Callback):
    """End fit cleanly after optimizer step ``step`` (its checkpoint is saved at that batch's end)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with attention dropout, so the random state matters for an exact resume."""
    directory = tmp_path_factory.mktemp("dropout_model")
    save_tiny_model(directory, CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4)
    config = AutoConfig.from_pretrained(directory)
    config.attention_dropout = 0.3
    config.save_pretrained(directory)
    return directory


def _fit(model_dir: Path, train: Path, root: Path, *, stop_at: int | None, ckpt_path: Path | None):
    L.seed_everything(0)
    module = PreferenceModule(
        str(model_dir),
        beta=0.5,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        warmup_ratio=0.3,
        attn_implementation="eager",  # dropout inside attention, on the torch generator
        disable_dropout=False,  # the dropout is the point: it makes the random state matter
    )
    data = PreferenceDataModule(
        train=DataSource(path=str(train)),
        tokenizer_name_or_path=str(model_dir),
        max_length=48,
        max_prompt_length=24,
        batch_size=BATCH,
    )
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_last=True, save_top_k=0),
        RNGStateCheckpoint(),
    ]
    if stop_at is not None:
        callbacks.append(StopAtStep(stop_at))
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("stop_at", [2, 3, 4], ids=["mid-epoch-0", "epoch-end", "mid-epoch-1"])
def test_resume_is_bitwise_exact(tmp_path: Path, dropout_model_dir: Path, stop_at: int) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(PAIRS))
    _, straight = _fit(dropout_model_dir, train, tmp_path / "straight", stop_at=None, ckpt_path=None)

    root = tmp_path / "stopped"
    stopped_trainer, _ = _fit(dropout_model_dir, train, root, stop_at=stop_at, ckpt_path=None)
    assert stopped_trainer.global_step == stop_at
    checkpoint = find_resume_checkpoint(root)
    assert checkpoint is not None and checkpoint.name == "last.ckpt"
    resumed_trainer, resumed = _fit(dropout_model_dir, train, root, stop_at=None, ckpt_path=checkpoint)

    assert resumed_trainer.global_step == EPOCHS * PAIRS // BATCH
    for (name, expected), (_, actual) in zip(
        straight.policy.state_dict().items(), resumed.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, actual), name
    # The weights moved (a resume that trained nothing would not be a test).
    start = AutoModelForCausalLM.from_pretrained(dropout_model_dir)
    assert not torch.equal(straight.policy.lm_head.weight, start.lm_head.weight)


def test_sampler_keeps_the_single_process_order_and_deals_global_batches() -> None:
    """World size 1 replays DataLoader(shuffle=True, generator) exactly; ranks split global batches."""
    items, seed = list(range(37)), 5
    loader = DataLoader(items, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for epoch in range(3):
        single = ResumableDistributedSampler(items, batch_size=5, seed=seed)
        single.set_epoch(epoch)
        assert list(single) == [int(i) for batch in loader for i in batch]

    # Two ranks with batch 2: their k-th batches together are the single process's k-th batch of 4.
    permutation = epoch_permutation(len(items), seed, 1)
    ranks = [
        ResumableDistributedSampler(items, batch_size=2, num_replicas=2, rank=r, seed=seed) for r in (0, 1)
    ]
    for sampler in ranks:
        sampler.set_epoch(1)
    per_rank = [list(sampler) for sampler in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 19  # 37 padded to 38: same batches on both ranks
    for k in range(9):
        together = sorted(per_rank[0][2 * k : 2 * k + 2] + per_rank[1][2 * k : 2 * k + 2])
        assert together == sorted(permutation[4 * k : 4 * k + 4])

    # A resume skips the batches already trained on, once, and only in the saved epoch.
    sampler = ResumableDistributedSampler(items, batch_size=2, num_replicas=2, rank=1, seed=seed)
    sampler.set_epoch(1)
    sampler.skip_batches(epoch=1, batches=3)
    assert list(sampler) == per_rank[1][6:]
    assert list(sampler) == per_rank[1]


def test_resuming_a_folder_started_with_another_config_is_refused(tmp_path: Path) -> None:
    """Two different fits sharing a folder name (e.g. one SLURM job) must not resume each other."""
    from ipo_lightning.errors import ConfigError
    from ipo_lightning.resume import check_same_run

    saved = {"model": {"loss_type": "ipo", "beta": 0.5}, "ckpt_path": None, "trainer": {"max_steps": 8}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_same_run(tmp_path, {**saved, "ckpt_path": "x.ckpt"})  # the very same run (a requeue) resumes
    with pytest.raises(ConfigError, match=r"model.loss_type='ipo', this run has model.loss_type='dpo'"):
        check_same_run(tmp_path, {**saved, "model": {"loss_type": "dpo", "beta": 0.5}})
    check_same_run(tmp_path / "fresh", saved)  # a folder without config.yaml: nothing to compare


# ---------------------------------------------------------------- metrics.csv history, corrupt checkpoints


def test_metrics_csv_keeps_the_rows_a_resume_continues_after(tmp_path: Path) -> None:
    """The first write keeps the history the checkpoint counted; new columns widen the header."""
    earlier = HistoryCSVLogger(tmp_path, name="", version="run")
    for step in range(5):
        earlier.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    earlier.save()
    assert earlier.rows_logged == 5

    resumed = HistoryCSVLogger(tmp_path, name="", version="run")
    assert resumed.experiment is not None  # opened as the trainer opens it: nothing is deleted yet
    assert len(csv_rows(tmp_path / "run" / "metrics.csv")[1]) == 5
    resumed.continue_history(3)  # the checkpoint was saved after 3 rows; rows 3 and 4 are logged again
    resumed.save()  # a checkpoint before the resumed run logged anything: the count includes the history
    assert resumed.rows_logged == 3 and len(csv_rows(tmp_path / "run" / "metrics.csv")[1]) == 3
    resumed.log_metrics({"train/loss": 0.25, "val/loss": 0.5}, step=3)
    resumed.save()
    resumed.log_metrics({"train/loss": 0.2}, step=4)
    resumed.save()  # appended under the same header
    resumed.log_metrics({"divergence/kl": 0.1}, step=4)
    resumed.save()  # a new column: the whole file rewritten, every row kept
    header, rows = csv_rows(tmp_path / "run" / "metrics.csv")
    assert header == ["divergence/kl", "step", "train/loss", "val/loss"]
    assert [(r["step"], r["train/loss"], r["val/loss"], r["divergence/kl"]) for r in rows] == [
        ("0", "1.0", "", ""),
        ("1", "0.5", "", ""),
        ("2", str(1.0 / 3), "", ""),
        ("3", "0.25", "0.5", ""),
        ("4", "0.2", "", ""),
        ("4", "", "", "0.1"),
    ]
    assert resumed.rows_logged == 6

    fresh = HistoryCSVLogger(tmp_path, name="", version="run")  # not a resume: a new file
    fresh.log_metrics({"train/loss": 9.0}, step=0)
    fresh.save()
    assert csv_rows(tmp_path / "run" / "metrics.csv") == (
        ["step", "train/loss"],
        [{"step": "0", "train/loss": "9.0"}],
    )


def test_resume_skips_unreadable_checkpoints(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    state = {"global_step": 4, "weights": torch.arange(50_000, dtype=torch.float32)}
    older, newest = tmp_path / "checkpoints" / "best.ckpt", tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(state, older)
    io.save_checkpoint(state, newest)
    os.utime(older, ns=(1, 1))  # best.ckpt older than last.ckpt
    assert find_resume_checkpoint(tmp_path) == newest and checkpoint_problem(newest) is None

    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated mid-write
    reported: list[tuple[Path, str]] = []
    assert find_resume_checkpoint(tmp_path, on_unreadable=lambda p, why: reported.append((p, why))) == older
    assert [path for path, _ in reported] == [newest]

    data = bytearray(older.read_bytes())  # same size, a block of the tensor data overwritten
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    older.write_bytes(bytes(data))
    os.utime(older, ns=(1, 1))
    assert "CRC" in (checkpoint_problem(older) or "")
    with pytest.raises(ConfigError, match=r"no checkpoint is readable \(last.ckpt, best.ckpt\)"):
        find_resume_checkpoint(tmp_path)
    assert find_resume_checkpoint(tmp_path / "empty") is None


def _save_forever(path: str) -> None:
    """Rewrite one checkpoint in a loop (killed from outside at a random moment)."""
    io, step = AtomicCheckpointIO(), 0
    while True:
        step += 1
        io.save_checkpoint({"global_step": step, "weights": torch.full((2_000_000,), float(step))}, path)


@pytest.mark.slow
def test_a_checkpoint_killed_mid_write_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    """SIGKILL at random moments of a writer that keeps replacing last.ckpt: it always reads back."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    context = multiprocessing.get_context("fork")
    generator = random.Random(0)
    steps = []
    for _ in range(8):
        writer = context.Process(target=_save_forever, args=(str(path),))
        writer.start()
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(generator.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        assert checkpoint_problem(path) is None
        loaded = torch.load(path, weights_only=True)
        assert torch.equal(loaded["weights"], torch.full((2_000_000,), float(loaded["global_step"])))
        steps.append(loaded["global_step"])
        assert [p.name for p in path.parent.glob("*.ckpt")] == ["last.ckpt"]  # the staging file is not one
    assert max(steps) > 1  # killed while replacing an earlier checkpoint, not only before the first


CLI_PAIRS, CLI_BATCH, CLI_STEPS = 16, 4, 8


def _cli_config(tmp_path: Path, model_dir: Path, root: Path) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(CLI_PAIRS))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(4, offset=100))
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root),
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": CLI_STEPS,
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "val_check_interval": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "every_n_train_steps": 2,
                        "save_top_k": -1,
                        "save_last": True,
                        "filename": "{step}",
                    },
                },
                {
                    "class_path": "tests.helpers.StepPacer",
                    "init_args": {"marker": str(root / "steps.txt"), "seconds": 0.5},
                },
            ],
        },
        "model": {
            "model_name_or_path": str(model_dir),
            "beta": 0.5,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        },
        "data": {
            "train": {"path": str(train)},
            "val": {"held_out": {"path": str(val)}},
            "max_length": 48,
            "max_prompt_length": 24,
            "batch_size": CLI_BATCH,
        },
        "divergence": {"sample_prompts": 0, "every_n_steps": 3},
        "wandb": {"enabled": False},
        "run": {"name": "run"},
    }
    root.mkdir(parents=True)
    return write_config(root.parent / f"{root.name}.yaml", config)


def _fit_cli(config: Path, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command("fit", "--config", str(config)),
        env=subprocess_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"fit timed out:\n{output[-3000:]}")
    return process.returncode, output


def _fit_in_process(config: Path, caplog: pytest.LogCaptureFixture) -> str:
    """``fit --config CONFIG`` through the CLI's entry point in this process, to a successful end: its
    output, Lightning's log lines (``Resuming from ...``) included."""
    caplog.clear()
    result = run_cli_in_process(["fit", "--config", str(config)])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr + caplog.text


@pytest.mark.slow
def test_killed_cli_run_resumes_with_its_history_and_survives_a_corrupt_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 after a checkpoint, rerun: metrics.csv and weights as an uninterrupted run's. Then a
    truncated last.ckpt falls back to the intact checkpoint of the same step; none readable: exit 2."""
    # The uninterrupted run only has to be over by the comparison: it runs beside the one killed.
    straight_process = _fit_cli(_cli_config(tmp_path, tiny_model_dir, tmp_path / "straight"), tmp_path)
    straight = tmp_path / "straight" / "run"

    root = tmp_path / "killed"
    config = _cli_config(tmp_path, tiny_model_dir, root)
    run_dir, marker = root / "run", root / "steps.txt"
    process = _fit_cli(config, tmp_path)
    deadline = time.monotonic() + 240
    points = run_dir / RESUME_POINTS_FILE
    # Step 3 under way: the step-2 checkpoint is saved and its batch is over (its resume point written).
    while not (marker.exists() and len(marker.read_text().split()) >= 3 and read_resume_points(points)):
        assert process.poll() is None and time.monotonic() < deadline, _finish(process)[1][-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # a real kill -9: no hook of the run runs
    process.wait(timeout=60)
    _, killed_rows = csv_rows(run_dir / "metrics.csv")
    checkpoint = find_resume_checkpoint(run_dir)
    assert checkpoint is not None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    stopped_at, at_save = state["global_step"], state["callbacks"]["MetricsHistory"]["metrics_rows"]
    assert 2 <= stopped_at < CLI_STEPS
    # The batch a checkpoint is saved in logs its training row and runs its validation after the save.
    (kept,) = [rows for step, rows in read_resume_points(points) if step == stopped_at]
    assert 0 < at_save < kept <= len(killed_rows)

    code, output = _finish(straight_process)
    assert code == 0, output[-3000:]
    # The reruns need no process of their own: the CLI's entry point in this process.
    output = _fit_in_process(config, caplog)
    assert f"Resuming from {checkpoint}" in output
    header, rows = csv_rows(run_dir / "metrics.csv")
    assert rows[:kept] == killed_rows[:kept]  # the earlier attempt's rows up to the checkpoint are kept
    assert {int(r["step"]) for r in rows[:kept] if r["train/loss"]} == set(range(stopped_at))
    assert any(r["val/loss"] for r in rows[at_save:kept])
    straight_header, straight_rows = csv_rows(straight / "metrics.csv")
    # No step twice, none missing, every value the same but the wall-clock timings (perf/).
    assert header == straight_header and any(r["perf/step_time"] for r in rows)
    assert without_timings(rows) == without_timings(straight_rows)
    weights = (run_dir / "hf_model" / "model.safetensors").read_bytes()
    assert weights == (straight / "hf_model" / "model.safetensors").read_bytes()  # bitwise

    # A finished run rerun with last.ckpt truncated: one warning naming it, resumed from step=8.ckpt,
    # nothing trained or logged twice.
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    output = _fit_in_process(config, caplog)
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(last) in warnings[0]
    assert f"Resuming from {run_dir / 'checkpoints' / f'step={CLI_STEPS}.ckpt'}" in output
    assert csv_rows(run_dir / "metrics.csv") == (header, rows)

    # No readable checkpoint at all: one line, exit 2, the folder's files untouched.
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capfd.readouterr()  # the output below is this run's only
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    output = "".join(capfd.readouterr())
    assert exit_info.value.code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint is readable" in errors[0] and "Traceback" not in output
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_cli_trainers_write_checkpoints_atomically() -> None:
    """The CLI's plugins: atomic checkpoint writes unless a checkpoint IO of the user's is given."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from ipo_lightning.cli import _plugins

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, plugins=_plugins(None, "auto"))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    own = TorchCheckpointIO()
    assert _plugins([own], "auto") == [own]


def _trained_weights(model_dir: Path, train: Path, val: Path | None, root: Path) -> dict[str, torch.Tensor]:
    """The policy's weights after 2 epochs with dropout on, validating after every step when ``val``."""
    L.seed_everything(0)
    module = PreferenceModule(str(model_dir), beta=0.5, attn_implementation="eager", disable_dropout=False)
    data = PreferenceDataModule(
        train=DataSource(path=str(train)),
        val={"held": DataSource(path=str(val))} if val else None,
        tokenizer_name_or_path=str(model_dir),
        max_length=48,
        max_prompt_length=24,
        batch_size=BATCH,
    )
    trainer = quiet_trainer(root, max_steps=-1, max_epochs=EPOCHS, val_check_interval=1 if val else None)
    trainer.fit(module, datamodule=data)
    return module.policy.state_dict()


def test_validating_does_not_change_what_training_draws(tmp_path: Path, dropout_model_dir: Path) -> None:
    # Dropout draws from the global torch RNG; a validation loader that took its worker seed from it
    # would shift every later dropout mask, so how often a run validates would change its weights.
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(PAIRS))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(4, offset=PAIRS))
    unvalidated = _trained_weights(dropout_model_dir, train, None, tmp_path / "plain")
    validated = _trained_weights(dropout_model_dir, train, val, tmp_path / "validated")
    for name, expected in unvalidated.items():
        assert torch.equal(expected, validated[name]), name
