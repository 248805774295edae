"""A LoRA policy under FSDP (configs/strategy/fsdp.yaml) on two CPU processes with the options that change
how it runs: gradient checkpointing (the backward recomputes each decoder layer) and a precomputed
reference (one scoring pass over every set before training). Each trains, validates and exports what one
process does with the same global batch."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from tests.helpers import (
    REPO,
    fit_config,
    logged_values,
    polite_pairs,
    run_clis,
    write_config,
    write_jsonl,
)
from tests.ranks import Torchrun

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
STEPS, LAYERS = 3, 2  # the tiny model's decoder layers
FITS = {
    "checkpointing": {"reference": "lora", "gradient_checkpointing": True},
    "precomputed": {"reference": "precomputed"},
}
"""The model options of each case, over a LoRA policy."""
RUN_FOLDER = Torchrun([]).folder
"""The run folder of each fit in its folder (torchrun's)."""
FSDP_ARGS = [
    *("--config", str(REPO / "configs" / "strategy" / "fsdp.yaml")),
    # After the strategy config, which names GPUs. One rank's batch of 1 pair: the global batch of 2.
    *("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.batch_size", "1"),
]


class BackwardLayerForwards(Callback):
    """Test callback: count the policy's decoder-layer forwards that run inside training backward passes.

    Activation checkpointing recomputes each checkpointed layer there, once per backward; without it
    none runs. Each layer's MLP is watched as it is entered: the checkpoint wraps the layer's
    ``forward`` (so the layer's own hooks run once), and the recompute stops once it has what the
    backward needs (so a hook at the MLP's exit may not run). At the end of training rank ``r`` writes
    its count to ``<folder>/rank<r>.txt``. The hooks stay on the policy, bound to this callback, which
    Lightning has bound to the LightningModule: the export's merged copy must leave them behind.

    Args:
        folder: where each rank writes its count.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.count = 0
        self.in_backward = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Hooks on the modules themselves, which FSDP's units wrap and still call.
        for module in pl_module.policy.modules():
            if isinstance(module, LlamaDecoderLayer):
                module.mlp.register_forward_pre_hook(self._entered)

    def _entered(self, *args: object) -> None:
        self.count += int(self.in_backward)

    def on_before_backward(self, *args: object) -> None:
        self.in_backward = True

    def on_after_backward(self, *args: object) -> None:
        self.in_backward = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (Path(self.folder) / f"rank{trainer.global_rank}.txt").write_text(str(self.count))


def _metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    """Every logged ``train/`` and ``val/`` value by (step, name)."""
    return logged_values(run_dir / "metrics.csv", ("train/", "val/"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Both cases, one process and FSDP on two, all four fits at the same time under torchrun: the
    folder holding ``<case>/<single|fsdp>/``, each with its run folder (:data:`RUN_FOLDER`), its own
    cache and counts, and the fit's output in ``log.txt``."""
    root = tmp_path_factory.mktemp("fsdp_lora")
    train = write_jsonl(root / "train.jsonl", polite_pairs(8))
    # 3 pairs over 2 ranks: one rank's second position is a weight-0 repeat.
    val = write_jsonl(root / "val.jsonl", polite_pairs(3, offset=100))
    commands: dict[Path, list[str]] = {}
    for case, model in FITS.items():
        for name, extra in {"single": [], "fsdp": FSDP_ARGS}.items():
            folder = root / case / name
            (folder / "counts").mkdir(parents=True)
            config = fit_config(
                folder,
                tiny_model_dir,
                train,
                {"held_out": val},
                trainer={
                    "max_steps": STEPS,
                    "val_check_interval": STEPS,
                    "num_sanity_val_steps": 0,
                    "enable_model_summary": False,
                    "callbacks": [
                        {
                            "class_path": f"{__name__}.BackwardLayerForwards",
                            "init_args": {"folder": str(folder / "counts")},
                        }
                    ],
                },
                model={
                    "lora": LORA,
                    **model,
                    # Plain SGD: Adam's normalisation would blow float noise in near-zero gradients up to lr.
                    "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
                    "warmup_ratio": 0.0,
                },
                # Own caches: the runs' reference log-prob files have the same names, and each must
                # compute its own.
                data={"batch_size": 2, "val_batch_size": 2, "cache_dir": str(folder / "cache")},
                divergence={"enabled": False},
                export={"save_adapter": True},
                wandb={"enabled": False},
            )
            config["trainer"]["default_root_dir"] = str(folder)
            config_path = write_config(root / f"{case}_{name}.yaml", config)
            commands[folder] = ["fit", "--config", str(config_path), *extra]
    # The one-process fits are torchrun's one-process runs: their output is kept as the others' is.
    runs = [Torchrun(args, nproc=2 if folder.name == "fsdp" else 1) for folder, args in commands.items()]
    results = dict(zip(commands, run_clis(root, *runs, timeout=600), strict=True))
    for folder, result in results.items():
        (folder / "log.txt").write_text(result.stdout + result.stderr)
    for folder, result in results.items():
        assert result.returncode == 0, (str(folder), (result.stdout + result.stderr)[-3000:])
    return root


def _assert_same_metrics(single: Path, fsdp: Path) -> None:
    """The ``train/`` and ``val/`` values of both runs, step by step (tolerance derived below)."""
    expected, actual = _metrics(single / RUN_FOLDER), _metrics(fsdp / RUN_FOLDER)
    assert expected.keys() == actual.keys()
    assert {name for _, name in expected} >= {"train/loss", "val/loss", "val/rewards/margin"}
    losses = [value for (_, name), value in sorted(expected.items()) if name == "train/loss"]
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it learned
    # Float32 in both. What differs between 1 and 2 processes: a pair's rows run in a batch of 1 pair
    # instead of 2 (another padded width: the kernels sum in another order, a few ulps per log-prob),
    # the means add the ranks' synced sums, and FSDP's reduce-scatter averages the ranks' gradients
    # (another summation order, ~1 ulp per gradient); validation splits 3 pairs as 2 + 1 and a
    # weight-0 repeat. Each is ~1e-7 of a value; measured over 3 SGD steps at lr 0.5: every value
    # bitwise equal. rel 1e-5 lies far above that and far below what one step moves the loss (0.25
    # to 0.2395: 4e-2).
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def _assert_same_export(tiny_model_dir: Path, single: Path, fsdp: Path) -> dict[str, torch.Tensor]:
    """The exported merged models of both runs load and hold the same, trained, weights; the FSDP run's."""
    base = load_file(tiny_model_dir / "model.safetensors")
    expected = AutoModelForCausalLM.from_pretrained(single / RUN_FOLDER / "hf_model").state_dict()
    merged = AutoModelForCausalLM.from_pretrained(fsdp / RUN_FOLDER / "hf_model").state_dict()
    assert set(merged) == set(expected)
    # As the losses, plus 3 SGD steps of the gradients' ~1e-7 relative differences at lr 0.5 (measured:
    # at most 7.5e-9 apart), while training moved the weights by 1.3e-2.
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert max((merged[name] - base[name]).abs().max().item() for name in base) > 1e-3
    return merged


def _backward_layer_forwards(run: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted((run / "counts").glob("rank*.txt"))]


@pytest.mark.slow
def test_lora_with_gradient_checkpointing_under_fsdp_matches_one_process(
    runs: Path, tiny_model_dir: Path
) -> None:
    single, fsdp = runs / "checkpointing" / "single", runs / "checkpointing" / "fsdp"
    # Checkpointing was on in both: every backward recomputed each decoder layer once, on every rank.
    assert _backward_layer_forwards(single) == [STEPS * LAYERS]
    assert _backward_layer_forwards(fsdp) == [STEPS * LAYERS] * 2
    _assert_same_metrics(single, fsdp)
    merged = _assert_same_export(tiny_model_dir, single, fsdp)
    # The unmerged adapter saved beside the export loads on the base and merges to it.
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), fsdp / RUN_FOLDER / "hf_model" / "adapter"
    )
    for name, tensor in adapter.merge_and_unload().state_dict().items():
        torch.testing.assert_close(tensor, merged[name], msg=name)


def _computed_cache_files(run: Path) -> dict[str, tuple[int, Path]]:
    """The sets whose reference log-probs the run computed (not read from a cache), by label: the number
    of processes that scored them and the cache file written, from the run's output."""
    pattern = r"Reference log-probs of (\S+): \d+ pairs in .*?, (\d+) process\(es\)\), cached in (\S+)"
    log = (run / "log.txt").read_text()
    return {label: (int(processes), Path(path)) for label, processes, path in re.findall(pattern, log)}


@pytest.mark.slow
def test_lora_with_a_precomputed_reference_under_fsdp_matches_one_process(
    runs: Path, tiny_model_dir: Path
) -> None:
    single, fsdp = runs / "precomputed" / "single", runs / "precomputed" / "fsdp"
    files, single_files = _computed_cache_files(fsdp), _computed_cache_files(single)
    assert set(files) == set(single_files) == {"train", "val/held_out"}
    for label, (processes, path) in files.items():
        assert processes == 2 and path.is_relative_to(fsdp / "cache")
        # The same key (same reference, pairs and settings), in each run's own cache.
        assert path.name == single_files[label][1].name
        computed, expected = load_file(path)["values"], load_file(single_files[label][1])["values"]
        assert computed.shape == expected.shape == (8 if label == "train" else 3, 4)
        torch.testing.assert_close(computed[:, 1::2], expected[:, 1::2], rtol=0, atol=0)  # token counts
        # Each rank scored every second pair, in batches of other widths than one process's: per token
        # a few ulps (c <= 4), and a sum of T token log-probs in another order moves by at most
        # (c + T / 2) * eps * |sum| (measured: bitwise equal). Pairs put back in the wrong order differ
        # by 0.08 or more.
        counts, sums = expected[:, 1::2], expected[:, 0::2]
        bound = (4 + counts / 2) * torch.finfo(torch.float32).eps * sums.abs()
        assert ((computed[:, 0::2] - sums).abs() <= bound).all(), (computed, expected)
    # No decoder layer ran in a backward: checkpointing is off here (the counter sees it when on).
    assert _backward_layer_forwards(fsdp) == [0, 0]
    _assert_same_metrics(single, fsdp)
    _assert_same_export(tiny_model_dir, single, fsdp)
