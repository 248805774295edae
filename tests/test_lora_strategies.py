"""A LoRA policy (its reference: the base with the adapters off) under the sharded strategies: FSDP on two
CPU processes trains and exports what one process does; DeepSpeed ZeRO-3 is refused at start-up."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ipo_lightning.callbacks import HFExport
from ipo_lightning.lora import _CALL_HOOK_TABLES, merged_copy
from ipo_lightning.module import PreferenceModule
from tests.helpers import REPO, fit_config, polite_pairs, run_clis, run_main, write_config, write_jsonl
from tests.ranks import Torchrun

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def _lora_config(tmp_path: Path, model_dir: Path, **sections: dict[str, object]) -> Path:
    """A fit config of a LoRA policy of the tiny model; ``sections`` merged over it."""
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(8))
    model = {"lora": LORA, **sections.pop("model", {})}
    config = fit_config(tmp_path, model_dir, train, model=model, **sections)
    return write_config(tmp_path / "config.yaml", config)


@pytest.mark.parametrize("strategy", ["deepspeed_zero3.yaml", "deepspeed_zero2.yaml"])
def test_lora_under_zero3_is_refused_at_start_up(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], strategy: str
) -> None:
    config = _lora_config(tmp_path, tiny_model_dir, trainer={"logger": False})
    args = ["fit", "--config", str(config), "--config", str(REPO / "configs" / "strategy" / strategy)]
    code, err = run_main(args, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    refused = "error: model.lora with trainer.strategy PreferenceDeepSpeedStrategy stage 3"
    if strategy == "deepspeed_zero3.yaml":
        assert lines[0].startswith(refused) and "configs/strategy/fsdp.yaml" in lines[0]
    else:  # ZeRO-2 holds whole weights: LoRA passes this check (and meets the next one here)
        assert not lines[0].startswith(refused)


class ExportGathers(Callback):
    """Test callback: records on rank 0 which FSDP units' weights are all-gathered (FSDP's own
    ``FlatParamHandle._all_gather_flat_param``, wrapped and called) while :class:`HFExport` exports,
    and writes ``{"gathers": N, "units": M}`` (M distinct units) to ``export_gathers.json`` in the run
    folder.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # FSDP's private internals, imported here so a move in torch fails this test only.
        from torch.distributed.fsdp._flat_param import FlatParamHandle

        (export,) = [callback for callback in trainer.callbacks if isinstance(callback, HFExport)]
        export_hook = export.on_fit_end
        real_gather = FlatParamHandle._all_gather_flat_param
        gathered: list[int] = []

        def counted_gather(handle: Any, *args: Any, **kwargs: Any) -> Any:
            gathered.append(id(handle))
            return real_gather(handle, *args, **kwargs)

        def counted_export(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            FlatParamHandle._all_gather_flat_param = counted_gather
            try:
                export_hook(trainer, pl_module)
            finally:
                FlatParamHandle._all_gather_flat_param = real_gather
            run_dir = Path(trainer.log_dir)  # every rank: log_dir is a broadcast
            if trainer.is_global_zero:
                counts = {"gathers": len(gathered), "units": len(set(gathered))}
                (run_dir / "export_gathers.json").write_text(json.dumps(counts))

        export.on_fit_end = counted_export


def _train_losses(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open() as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.mark.slow
def test_lora_under_fsdp_and_fsdp2_trains_and_exports_what_one_process_does(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    counter = {"class_path": f"{__name__}.ExportGathers"}
    config = _lora_config(
        tmp_path,
        tiny_model_dir,
        trainer={
            "max_steps": 3,
            "limit_val_batches": 0,
            "enable_model_summary": False,
            "callbacks": [counter],
        },
        model={
            "reference": "lora",
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            "warmup_ratio": 0.0,
        },
        data={"batch_size": 2},
        divergence={"every_n_steps": 0},
        export={"save_adapter": True},
        wandb={"enabled": False},
    )
    single = tmp_path / "single"
    sharded = {name: tmp_path / name for name in ("fsdp", "fsdp2")}
    runs = {single: []}
    for name, root in sharded.items():
        strategy = ["--config", str(REPO / "configs" / "strategy" / f"{name}.yaml"), "--trainer.devices", "2"]
        # One rank's batch of 1 pair: the global batch of 2 pairs, as in the single run.
        runs[root] = [*strategy, "--trainer.accelerator", "cpu", "--data.batch_size", "1"]
    # All three under torchrun (the one-process run as its one process), at the same time.
    commands = [
        Torchrun(
            ["fit", "--config", str(config), *args, "--trainer.default_root_dir", str(root)],
            nproc=1 if root == single else 2,
        )
        for root, args in runs.items()
    ]
    for result in run_clis(tmp_path, *commands):
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run_folder = commands[0].folder

    # The FSDP export gathered each FSDP unit's weights once (the merge and the state dict share them).
    counts = json.loads((sharded["fsdp"] / run_folder / "export_gathers.json").read_text())
    assert counts["units"] >= 1 and counts["gathers"] == counts["units"], counts
    assert json.loads((single / run_folder / "export_gathers.json").read_text())["gathers"] == 0
    single_losses = _train_losses(single / run_folder)
    assert len(single_losses) == 3 and single_losses[-1] < single_losses[0]  # it learned
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(single / run_folder / "hf_model").state_dict()
    for name, root in sharded.items():
        assert _train_losses(root / run_folder) == pytest.approx(single_losses, rel=1e-5), name
        # The export: the merged model, a plain folder; the same weights as one process's, trained ones.
        merged = AutoModelForCausalLM.from_pretrained(root / run_folder / "hf_model").state_dict()
        assert set(merged) == set(expected), name
        for key, tensor in expected.items():
            torch.testing.assert_close(merged[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        assert max((merged[key] - base[key]).abs().max().item() for key in base) > 1e-3
        # The unmerged adapter saved beside it loads on the base and merges to the export.
        adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), root / run_folder / "hf_model" / "adapter"
        )
        for key, tensor in adapter.merge_and_unload().state_dict().items():
            torch.testing.assert_close(tensor, merged[key], msg=f"{name}: {key}")
        # The checkpoint (one file of full weights) loads back into one process's module.
        (checkpoint,) = (root / run_folder / "checkpoints").glob("*.ckpt")
        restored = PreferenceModule.load_from_checkpoint(checkpoint)
        for key, tensor in merged_copy(restored.policy).state_dict().items():
            torch.testing.assert_close(tensor, merged[key], msg=f"{name}: {key}")


class _ActivationLogger:
    """A callback-like owner of a forward hook that deep copy cannot copy (it holds a Python module)."""

    def __init__(self) -> None:
        self.library = torch  # a module object: copy.deepcopy refuses it ("cannot pickle 'module'")
        self.calls = 0

    def record(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self.calls += 1


def test_the_merged_export_copy_leaves_the_policys_hooks_behind(tiny_model_dir: Path) -> None:
    module = PreferenceModule(str(tiny_model_dir), lora={"rank": 4, "target_modules": ["q_proj"]})
    module.configure_model()
    logger = _ActivationLogger()
    layer = module.policy.get_base_model().model.layers[0]
    layer.register_forward_hook(logger.record)

    merged = merged_copy(module.policy)  # copying the hook would copy its owner and fail

    ids = torch.tensor([[1, 2, 3]])
    merged(input_ids=ids)
    assert logger.calls == 0  # the copy runs without the hook
    module.policy(input_ids=ids)
    assert logger.calls == 1  # the policy keeps it
    # The merged weights are the policy's (adapters start at B = 0, so merged q_proj equals the base's).
    base = module.policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base)


def test_the_merged_copy_knows_every_call_hook_table_of_a_module() -> None:
    # nn.Module's hook tables are private; one torch adds later must not be deep-copied again unseen.
    tables = {name for name in vars(torch.nn.Linear(1, 1)) if "hook" in name and "state_dict" not in name}
    assert tables - {"_is_full_backward_hook"} == set(_CALL_HOOK_TABLES)
