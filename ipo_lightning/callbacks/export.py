"""Export the trained policy in Hugging Face format at the end of a successful fit."""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoTokenizer, PreTrainedModel

from ipo_lightning import fsdp2
from ipo_lightning.analysis.run_logs import RunMetrics
from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.distributed import full_policy_state_dict, full_weights_for_local_forwards
from ipo_lightning.errors import ConfigError
from ipo_lightning.hub import check_hub_access, push_export, push_plan
from ipo_lightning.lora import is_lora, merged_copy, merged_from_state_dict
from ipo_lightning.model_card import CARD_FILENAME, CONFIG_FILENAME, build_model_card

ADAPTER_DIRNAME = "adapter"
RUN_CONFIG_FILENAME = "config.yaml"
"""The resolved config the CLI saves in the run folder (``SaveConfigCallback``'s default name)."""


class HFExport(Callback):
    """Save the policy and its tokenizer with ``save_pretrained`` into ``<run dir>/<dirname>``.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``. A module whose ``export_attribute`` names another model (the
    reward model's ``model``, an ``AutoModelForSequenceClassification``) exports that one instead, and
    its ``export_info()`` is what ``ipo_lightning.json`` states.

    The folder is written to a temporary sibling and renamed at the end, so an interrupted export never
    leaves a folder that looks finished; a fit that fails or is interrupted exports nothing
    (``on_fit_end`` runs only after a completed fit), and neither does one whose weights are not finite
    (a warning says so). Its folders and files get the modes the process umask gives, like every other
    file of the run.

    A LoRA policy is exported merged (adapters folded into the weights), as a plain model that loads
    without peft; with ``save_adapter`` its unmerged adapter is saved too, in ``<dirname>/adapter``
    (load it with ``peft.PeftModel.from_pretrained(base_model, that_folder)``).

    The folder holds a model card (``README.md``, :mod:`ipo_lightning.model_card`) written from the
    run's ``config.yaml`` and ``metrics.csv`` (flushed first), and a copy of that config
    (``ipo_lightning_config.yaml``). After the rename, rank 0 logs the folder as a W&B model artifact
    when a W&B logger is attached, then uploads it to the hub with ``push_to_hub``; the hub's access
    is checked when the fit starts (``setup``), so a missing token fails before training.

    Args:
        enabled: export at the end of ``fit``.
        dirname: folder name inside the run directory (``trainer.log_dir``).
        save_adapter: LoRA policies: also save the unmerged adapter in ``<dirname>/adapter``.
        push_to_hub: hub repo id (``user/name``) to upload the export to at the end of a successful
            fit; needs a token (``hf auth login`` or HF_TOKEN), checked at start-up.
        private: create the hub repo private (an existing repo keeps its visibility).
        wandb_artifact: with a W&B logger, log the export as a W&B artifact of type ``model``, named
            ``<dirname>-<W&B run id>``. The artifact refers to the export's files where they are (no
            copy), so an offline run uploads them on ``wandb sync`` as long as they are still there.
    """

    def __init__(
        self,
        enabled: bool = True,
        dirname: str = "hf_model",
        save_adapter: bool = False,
        push_to_hub: str | None = None,
        private: bool = False,
        wandb_artifact: bool = True,
    ) -> None:
        super().__init__()
        self.enabled = enabled
        self.dirname = dirname
        self.save_adapter = save_adapter
        self.push_to_hub = push_to_hub
        self.private = private
        self.wandb_artifact = wandb_artifact
        self.export_dir: Path | None = None
        self.pushed_url: str | None = None
        """The hub commit of the last push (None: nothing pushed)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before a fit that pushes: check the repo id, the token and that the hub answers."""
        if stage != "fit" or not self.push_to_hub:
            return
        if not self.enabled:
            raise ConfigError(f"export.push_to_hub={self.push_to_hub} needs export.enabled true")
        # Every rank checks (one request each), so all of them stop alike instead of waiting on rank 0.
        check_hub_access(self.push_to_hub)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        target = run_dir / self.dirname
        self.export_dir = target
        # A module may export another model than its policy (a reward model's classifier).
        attribute = getattr(pl_module, "export_attribute", "policy")
        # Every rank takes part: under FSDP and ZeRO-3 the weights are gathered from all of them.
        policy = _unwrapped(getattr(pl_module, attribute))
        if is_lora(policy):
            state_dict, merged = _merged_lora(trainer, pl_module, attribute)
        else:
            state_dict, merged = full_policy_state_dict(trainer, pl_module, attribute), None
        if not trainer.is_global_zero:
            return
        nonfinite = [name for name, tensor in state_dict.items() if not torch.isfinite(tensor).all()]
        if nonfinite:
            # A NaN model that loads like a trained one is worse than none (see NonFiniteGuard).
            rank_zero_warn(
                f"not exporting to {target}: {len(nonfinite)} of {len(state_dict)} weight tensors of the "
                f"{attribute} are not finite (nan or inf), e.g. {nonfinite[0]}"
            )
            self.export_dir = None
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule else None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(pl_module.hparams.model_name_or_path)
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{self.dirname}-{secrets.token_hex(4)}"
        staging.mkdir()  # unlike tempfile.mkdtemp's 0700, the umask decides
        try:
            if merged is not None:
                merged.save_pretrained(staging, safe_serialization=True)
                if self.save_adapter:  # the adapter's weights cut from the full state dict
                    policy.save_pretrained(
                        staging / ADAPTER_DIRNAME, state_dict=state_dict, safe_serialization=True
                    )
            else:
                policy.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            info = _export_info(pl_module, trainer.global_step)
            (staging / "ipo_lightning.json").write_text(json.dumps(info, indent=2) + "\n")
            self._write_card(staging, trainer, pl_module, run_dir)
            _apply_umask(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        rank_zero_info(f"Exported the trained {attribute} to {target}")
        if self.wandb_artifact:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    _log_wandb_artifact(logger, target, self.dirname, info)
        if self.push_to_hub:
            plan = push_plan(target, self.push_to_hub, self.private, trainer.global_step)
            self.pushed_url = push_export(plan)
            rank_zero_info(f"Pushed the export to the hub: {self.pushed_url}")

    def _write_card(
        self, folder: Path, trainer: L.Trainer, pl_module: L.LightningModule, run_dir: Path
    ) -> None:
        """Write the model card (and the run's config, when there is one) into ``folder``."""
        config_file = run_dir / RUN_CONFIG_FILENAME
        datamodule = trainer.datamodule
        if config_file.is_file():
            config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            shutil.copyfile(config_file, folder / CONFIG_FILENAME)
        else:  # the Python API: the same settings, as the module and data module hold them
            config = {
                "method": getattr(pl_module, "method_name", "preference"),
                "model": dict(pl_module.hparams),
                "data": dict(datamodule.hparams) if datamodule else {},
            }
        train_dataset = getattr(datamodule, "train_dataset", None)
        card = build_model_card(
            RunMetrics(run_dir=run_dir, rows=_flushed_metrics(trainer), config=config),
            global_step=trainer.global_step,
            train_pairs=len(train_dataset) if train_dataset is not None else None,
            reproducible=config_file.is_file(),
            title=self.push_to_hub or f"{run_dir.name}/{self.dirname}",
        )
        card.save(folder / CARD_FILENAME)


def _export_info(pl_module: L.LightningModule, global_step: int) -> dict[str, Any]:
    """What ``ipo_lightning.json`` states: the module's ``export_info()`` where it has one (the reward
    model, the on-policy methods), else the preference settings (loss, beta, length normalisation,
    reference, LoRA); always the ``method`` first and the step last."""
    if hasattr(pl_module, "export_info"):
        return {**pl_module.export_info(), "global_step": global_step}
    hp = pl_module.hparams
    return {
        "method": getattr(pl_module, "method_name", "preference"),
        "base_model": hp.model_name_or_path,
        "loss_type": hp.get("loss_type"),
        "beta": hp.beta,
        "label_smoothing": hp.get("label_smoothing", 0.0),
        "length_normalize": hp.get("length_normalize"),
        "reference": hp.get("reference"),
        "lora": hp.get("lora"),
        "global_step": global_step,
    }


def _flushed_metrics(trainer: L.Trainer) -> list[dict[str, Any]]:
    """The rows of the first CSV logger's ``metrics.csv``, pending rows written first ([] without one).

    ``on_fit_end`` runs before the loggers' ``finalize`` (which would flush them), so the last
    validation's rows may still be in memory here.
    """
    logger = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
    if logger is None:
        return []
    logger.save()
    path = Path(logger.experiment.metrics_file_path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _log_wandb_artifact(logger: WandbLogger, folder: Path, dirname: str, info: dict[str, Any]) -> None:
    """Log ``folder`` to ``logger``'s run as a ``model`` artifact named ``<dirname>-<run id>``."""
    import wandb

    run = logger.experiment
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{dirname}-{run.id}")
    artifact = wandb.Artifact(name, type="model", metadata=info)
    # "immutable": W&B refers to the export's own files instead of copying them into its staging
    # folder (a second copy of the weights); an offline run's record names them by absolute path.
    artifact.add_dir(str(folder.resolve()), policy="immutable")
    run.log_artifact(artifact, aliases=["latest", f"step-{info['global_step']}"])
    rank_zero_info(f"Logged the export as W&B artifact {name}")


def _apply_umask(folder: Path) -> None:
    """Give ``folder``'s files and folders the modes the umask gives new ones.

    Some writers (safetensors) create their file with mode 0600 whatever the umask; the export should
    be as readable as the rest of the run folder.
    """
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _merged_lora(
    trainer: L.Trainer, pl_module: L.LightningModule, attribute: str
) -> tuple[dict[str, torch.Tensor] | None, PreTrainedModel | None]:
    """On rank 0 the LoRA policy ``pl_module.<attribute>``'s full state dict and the policy with its
    adapters merged (:func:`merged_copy`); ``(None, None)`` elsewhere.

    Call it on every rank: under FSDP both come from one gather of the policy's full weights on every
    rank (one unsharded copy of the policy per device while it runs; on rank 0 also the merged copy
    and a CPU copy of the state dict, as FSDP's own full state dict holds it). Under FSDP2 the full
    state dict is gathered to rank 0's CPU memory and the merge rebuilds the policy from it
    (:func:`merged_from_state_dict`). DDP, ZeRO-2 and one process hold whole weights already. ZeRO-3
    is refused with LoRA at start-up (:func:`ipo_lightning.distributed.check_lora_strategy`).
    """
    if fsdp2.is_fsdp2(trainer.strategy):  # its units cannot be copied: merge from the gathered weights
        state_dict = full_policy_state_dict(trainer, pl_module, attribute)
        if state_dict is None:
            return None, None
        return state_dict, merged_from_state_dict(getattr(pl_module, attribute), state_dict)
    with full_weights_for_local_forwards(trainer.strategy) as gathered:
        if not trainer.is_global_zero:
            return None, None
        policy = getattr(pl_module, attribute)  # the plain peft model while the weights are gathered
        state_dict = policy.state_dict()
        if gathered:  # the gathered weights are freed on exit; the state dict outlives it
            state_dict = {name: tensor.detach().to("cpu", copy=True) for name, tensor in state_dict.items()}
        return state_dict, merged_copy(policy)


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside an FSDP unit (its ``save_pretrained`` and config)."""
    return getattr(module, "_fsdp_wrapped_module", module)
