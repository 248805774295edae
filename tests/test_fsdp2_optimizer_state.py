"""FSDP2 on two CPU processes with optimizer state: SGD with momentum keeps a buffer per parameter, each
rank holding the shards of its parameters' buffers. A checkpoint holds the buffers one process holds
(gathered, keyed by optimizer position), and a one-process checkpoint resumes on two ranks with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ipo_lightning.cli import main
from tests.helpers import REPO, fit_config, polite_pairs, run_clis, write_config, write_jsonl
from tests.ranks import Torchrun

PAIRS, GLOBAL_BATCH, STEPS, EVERY = 8, 4, 4, 2  # 2 optimizer steps per epoch, a checkpoint after each epoch
LR, MOMENTUM = 0.1, 0.9
FSDP2_ARGS = [
    *("--config", str(REPO / "configs" / "strategy" / "fsdp2.yaml")),
    *("--trainer.accelerator", "cpu", "--trainer.devices", "2"),
]


def _config(folder: Path, model_dir: Path, per_rank_batch: int) -> Path:
    """A fit of :data:`STEPS` steps of SGD with momentum, keeping a checkpoint every :data:`EVERY` steps
    in ``folder/steps``."""
    train = write_jsonl(folder / "train.jsonl", polite_pairs(PAIRS))
    every = {"dirpath": str(folder / "steps"), "every_n_train_steps": EVERY, "save_top_k": -1}
    config = fit_config(
        folder,
        model_dir,
        train,
        trainer={
            "max_steps": STEPS,
            "max_epochs": 2,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": every}],
        },
        model={
            "beta": 0.5,
            # SGD, not Adam: the momentum buffers are sums of gradients, so the ranks' float noise in
            # near-zero gradients stays noise (Adam's normalisation would blow it up to the lr).
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": LR, "momentum": MOMENTUM}},
            "warmup_ratio": 0.0,
        },
        data={"max_length": 48, "max_prompt_length": 24, "batch_size": per_rank_batch},
        divergence={"enabled": False},
        export={"enabled": False},
        wandb={"enabled": False},
    )
    return write_config(folder / "config.yaml", config)


def _checkpoint(folder: Path, step: int) -> dict[str, Any]:
    (path,) = (folder / "steps").glob(f"*step={step}.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """The folders of three fits: ``single`` (one process, global batch 4), ``fsdp2`` (two ranks of batch
    2 from the start) and ``resumed`` (two ranks, from ``single``'s step-2 checkpoint)."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("single", "fsdp2", "resumed")}

    def fit(name: str, per_rank_batch: int) -> list[str]:
        return ["fit", "--config", str(_config(folders[name], tiny_model_dir, per_rank_batch))]

    # The two-rank fit under torchrun, the one-process fit in this process meanwhile.
    two_ranks = Torchrun([*fit("fsdp2", GLOBAL_BATCH // 2), *FSDP2_ARGS])
    (result,) = run_clis(folders["fsdp2"], two_ranks, meanwhile=lambda: main(fit("single", GLOBAL_BATCH)))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (step_2,) = (folders["single"] / "steps").glob(f"*step={EVERY}.ckpt")
    resumed = Torchrun([*fit("resumed", GLOBAL_BATCH // 2), *FSDP2_ARGS, "--ckpt_path", str(step_2)])
    (result,) = run_clis(folders["resumed"], resumed)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return folders


# What differs between one process and two: a pair's rows run in a batch of 2 pairs instead of 4
# (another padded width: a few ulps per log-prob), and FSDP2's reduce-scatter averages the ranks'
# gradients in another order (~1 ulp); over the steps the weights drift apart by that much and the
# gradients with them. Measured: the buffers at most 2.2e-6 of their tensor's largest value apart after
# 4 steps, the weights 4e-8. 1e-4 of the largest value lies far above that and a hundred times below
# what a lost or misplaced buffer changes (both checked below).
def _assert_same_momentum(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    assert len(expected["state"]) == len(expected["param_groups"][0]["params"]) > 0
    for position, state in expected["state"].items():
        buffer = state["momentum_buffer"]
        scale = float(buffer.abs().max())
        torch.testing.assert_close(
            actual["state"][position]["momentum_buffer"], buffer, rtol=1e-4, atol=1e-4 * scale, msg=position
        )
    # A buffer put back at another position of the same shape would fail: no two lie that close.
    buffers = [state["momentum_buffer"] for state in expected["state"].values()]
    for index, buffer in enumerate(buffers):
        for other in buffers[index + 1 :]:
            if other.shape == buffer.shape:
                assert float((other - buffer).abs().max()) > 1e-2 * float(buffer.abs().max())


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("step", [EVERY, STEPS])
def test_two_ranks_checkpoint_the_momentum_one_process_holds(runs: dict[str, Path], step: int) -> None:
    single, fsdp2 = _checkpoint(runs["single"], step), _checkpoint(runs["fsdp2"], step)
    (expected,), (actual,) = single["optimizer_states"], fsdp2["optimizer_states"]
    _assert_same_momentum(actual, expected)
    _assert_same_weights(fsdp2["state_dict"], single["state_dict"])


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_ranks_with_its_momentum(runs: dict[str, Path]) -> None:
    single, resumed = _checkpoint(runs["single"], STEPS), _checkpoint(runs["resumed"], STEPS)
    assert not list((runs["resumed"] / "steps").glob(f"*step={EVERY}.ckpt"))  # it began after step 2
    (expected,), (actual,) = single["optimizer_states"], resumed["optimizer_states"]
    _assert_same_momentum(actual, expected)
    _assert_same_weights(resumed["state_dict"], single["state_dict"])
    # Resumed without the step-2 buffers, step 4's would lack MOMENTUM**2 times them: in every tensor
    # with a gradient, a hundred times the tolerance or more.
    (at_step_2,) = _checkpoint(runs["single"], EVERY)["optimizer_states"]
    for position, state in at_step_2["state"].items():
        buffer, final = state["momentum_buffer"], expected["state"][position]["momentum_buffer"]
        if buffer.abs().max() > 0:
            assert float((MOMENTUM**2 * buffer).abs().max()) > 1e-2 * float(final.abs().max()), position
