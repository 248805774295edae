"""Export the trained policy in Hugging Face format at the end of a successful fit."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoTokenizer

from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.distributed import full_policy_state_dict
from ipo_lightning.lora import is_lora, merged_copy

ADAPTER_DIRNAME = "adapter"


class HFExport(Callback):
    """Save the policy and its tokenizer with ``save_pretrained`` into ``<run dir>/<dirname>``.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``. It is written to a temporary sibling and renamed at the end, so
    an interrupted export never leaves a folder that looks finished; a fit that fails or is
    interrupted exports nothing (``on_fit_end`` runs only after a completed fit), and neither does one
    whose weights are not finite (a warning says so). Its folders and files get the modes the process
    umask gives, like every other file of the run.

    A LoRA policy is exported merged (adapters folded into the weights), as a plain model that loads
    without peft; with ``save_adapter`` its unmerged adapter is saved too, in ``<dirname>/adapter``
    (load it with ``peft.PeftModel.from_pretrained(base_model, that_folder)``).

    Args:
        enabled: export at the end of ``fit``.
        dirname: folder name inside the run directory (``trainer.log_dir``).
        save_adapter: LoRA policies: also save the unmerged adapter in ``<dirname>/adapter``.
    """

    def __init__(self, enabled: bool = True, dirname: str = "hf_model", save_adapter: bool = False) -> None:
        super().__init__()
        self.enabled = enabled
        self.dirname = dirname
        self.save_adapter = save_adapter
        self.export_dir: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        target = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        self.export_dir = target
        # Every rank takes part: under FSDP and ZeRO-3 the weights are gathered from all of them.
        state_dict = full_policy_state_dict(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        nonfinite = [name for name, tensor in state_dict.items() if not torch.isfinite(tensor).all()]
        if nonfinite:
            # A NaN model that loads like a trained one is worse than none (see NonFiniteGuard).
            rank_zero_warn(
                f"not exporting to {target}: {len(nonfinite)} of {len(state_dict)} weight tensors of the "
                f"policy are not finite (nan or inf), e.g. {nonfinite[0]}"
            )
            self.export_dir = None
            return
        policy = _unwrapped(pl_module.policy)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule else None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(pl_module.hparams.model_name_or_path)
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{self.dirname}-{secrets.token_hex(4)}"
        staging.mkdir()  # unlike tempfile.mkdtemp's 0700, the umask decides
        try:
            if is_lora(policy):
                # Not gathered: LoRA is supported with DDP and one process, where weights are whole.
                merged_copy(policy).save_pretrained(staging, safe_serialization=True)
                if self.save_adapter:
                    policy.save_pretrained(staging / ADAPTER_DIRNAME, safe_serialization=True)
            else:
                policy.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            info = {
                "base_model": pl_module.hparams.model_name_or_path,
                "loss_type": pl_module.hparams.loss_type,
                "beta": pl_module.hparams.beta,
                "length_normalize": pl_module.hparams.length_normalize,
                "reference": pl_module.hparams.get("reference"),
                "lora": pl_module.hparams.get("lora"),
                "global_step": trainer.global_step,
            }
            (staging / "ipo_lightning.json").write_text(json.dumps(info, indent=2) + "\n")
            _apply_umask(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        rank_zero_info(f"Exported the trained policy to {target}")


def _apply_umask(folder: Path) -> None:
    """Give ``folder``'s files and folders the modes the umask gives new ones.

    Some writers (safetensors) create their file with mode 0600 whatever the umask; the export should
    be as readable as the rest of the run folder.
    """
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside an FSDP unit (its ``save_pretrained`` and config)."""
    return getattr(module, "_fsdp_wrapped_module", module)
