"""Sharded strategies that handle the frozen reference right by construction, and the full-weight export.

Use them by class path (``configs/strategy/fsdp.yaml``, ``deepspeed_zero{2,3}.yaml``):

- :class:`PreferenceFSDPStrategy`: FSDP with one unit per decoder layer and one for the policy model
  (its embeddings and head); ``use_orig_params`` is on, so the module's optimizer sees the policy's
  real parameters. The reference is left out of FSDP (``ignored_states``) and replicated on every
  device: in FSDP units its frozen weights would share flat parameters and state-dict hooks with the
  trained ones (a full state dict then failed with a KeyError on the reference's keys).
- :class:`~ipo_lightning.fsdp2.PreferenceFSDP2Strategy` (``fsdp2.yaml``): FSDP2, where the reference is
  sharded too (:mod:`ipo_lightning.fsdp2`).
- :class:`PreferenceDeepSpeedStrategy`: DeepSpeed that loads the models without ``deepspeed.zero.Init``:
  inside it, ``from_pretrained`` and the copy of the policy made for the reference see empty
  partitioned tensors (the classic ZeRO-3 failure). The engine partitions the full models when it is
  built; the cost is one full copy of policy and reference in host memory per process at start-up.

The reference stays a :class:`~ipo_lightning.reference.FrozenReference` under every strategy: eval
mode whatever the strategy calls, no gradients, not in the optimizer, nothing in checkpoints.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn
from transformers import PreTrainedModel

from ipo_lightning import fsdp2
from ipo_lightning.errors import ConfigError
from ipo_lightning.reference import FrozenReference


def _no_split_classes(module: nn.Module) -> set[str]:
    """Class names that Hugging Face marks as not to be split (its decoder layers), over all models."""
    names: set[str] = set()
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):
            names.update(getattr(sub, "_no_split_modules", None) or [])
    return names


class _PreferenceWrapPolicy:
    """FSDP auto-wrap policy: each Hugging Face model and each of its no-split layers is a unit.

    Computed from the module when called (FSDP calls it with the root first), so it fits any model
    family without naming its layer class in the config.
    """

    def __init__(self) -> None:
        self.layer_classes: set[str] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.layer_classes is None:
            self.layer_classes = _no_split_classes(module)
        if recurse:
            return True  # always look inside
        if isinstance(module, FrozenReference):
            return False  # ignored by FSDP (see PreferenceFSDPStrategy._setup_model)
        return isinstance(module, PreTrainedModel) or type(module).__name__ in self.layer_classes


class PreferenceFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with a wrap policy for a policy + frozen reference pair.

    ``auto_wrap_policy`` defaults to one unit per Hugging Face model and per decoder layer (module
    docstring).

    Args:
        sharding_strategy: what FSDP shards: ``FULL_SHARD`` (weights, gradients, optimizer state),
            ``SHARD_GRAD_OP`` (gradients and optimizer state), ``NO_SHARD`` (DDP-like), ``HYBRID_SHARD``.
        state_dict_type: ``full``: checkpoints hold the whole policy in one file, loadable anywhere;
            ``sharded``: one file per rank (faster for large models, resumable on the same world size).
        cpu_offload: keep sharded weights in CPU memory between uses (slow; for the largest models).
        use_orig_params: expose the original parameters to the optimizer (the module selects the
            policy's trainable ones); needed here, keep it on.
        kwargs: further ``FSDPStrategy`` / ``FullyShardedDataParallel`` arguments.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        use_orig_params: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("auto_wrap_policy", _PreferenceWrapPolicy())
        super().__init__(
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            use_orig_params=use_orig_params,
            **kwargs,
        )

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # The reference stays out of FSDP: replicated on every device, in eval mode, never flattened
        # with trainable weights and never touched by FSDP's state-dict hooks (it saves nothing).
        # FSDP moves only what it wraps, so the reference is put on this rank's device here.
        references = [module for module in model.modules() if isinstance(module, FrozenReference)]
        for reference in references:
            reference.to(self.root_device)
        self.kwargs["ignored_states"] = references
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # CPU processes (gloo), as the tests run it: FSDP needs the CPU named as its device, which
        # Lightning (which refuses FSDP on CPU for its own class) does not pass.
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    # FSDP's full state dict offloaded "to the CPU" crashes the process (SIGSEGV, torch 2.13, gloo) when
    # the weights already live on the CPU; Lightning always offloads. On CPU, gather without it.

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with _full_state_dict_context(self.model, offload_to_cpu=False):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with _full_state_dict_context(self.model, offload_to_cpu=False):
            return FSDP.optim_state_dict(self.model, optimizer)


def _full_state_dict_context(model: nn.Module, *, offload_to_cpu: bool) -> Any:
    """FSDP's full (unsharded) model and optimizer state dicts, gathered to rank 0."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True),
    )


class PreferenceDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` without ``zero.Init`` around ``configure_model`` (module docstring).

    Args:
        kwargs: ``DeepSpeedStrategy`` arguments (``stage``, ``offload_optimizer``, ``config``, ...).
    """

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        yield


def full_policy_state_dict(
    trainer: L.Trainer, pl_module: L.LightningModule, attribute: str = "policy"
) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) weights of ``pl_module.<attribute>`` on rank 0, None elsewhere.

    Call it on every rank: FSDP and DeepSpeed ZeRO-3 keep each weight in pieces across ranks, so
    gathering is collective. Under FSDP the root's full state dict is taken (a nested unit's own
    ``state_dict`` returns its local shard) and the policy's keys are cut out of it; FSDP2 gathers the
    model's own (:func:`ipo_lightning.fsdp2.full_state_dict`). DDP, ZeRO-1/2 and one process hold full
    weights everywhere and just return them on rank 0.
    """
    strategy: Strategy = trainer.strategy
    model: nn.Module = getattr(pl_module, attribute)
    if fsdp2.is_fsdp2(strategy):
        return fsdp2.full_state_dict(trainer, model)
    if isinstance(strategy, FSDPStrategy):
        with _full_state_dict_context(strategy.model, offload_to_cpu=strategy.root_device.type != "cpu"):
            full = strategy.model.state_dict()
        prefix = f"{attribute}."
        state = {key[len(prefix) :]: value for key, value in full.items() if key.startswith(prefix)}
    elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed  # present: the strategy could not run without it

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    else:
        state = model.state_dict()
    return state if trainer.is_global_zero else None


@contextmanager
def full_weights_for_local_forwards(
    strategy: Strategy | None, module: nn.Module | None = None
) -> Generator[bool, None, None]:
    """Inside: the LightningModule's submodules run plain forwards (and ``generate()``) with full weights,
    on this rank alone, so ranks may run different numbers of forwards and ``generate()`` calls.
    ``module`` (FSDP2 only) limits the gathering to that part of it, e.g. the policy alone; no
    ``strategy`` (a module used outside a trainer) holds its weights whole.

    Under FSDP (``FullyShardedDataParallel``, as :class:`PreferenceFSDPStrategy` wraps the module) every
    unit's full parameters are gathered once on entry, a collective that every rank must enter
    (``summon_full_params``, read-only: nothing is written back), and every unit is swapped for the
    module it wraps, so that no forward re-enters FSDP's own gather and reshard. FSDP also marks every
    module it manages (``_is_fsdp_managed_module``), from which Hugging Face's ``generate()`` turns on
    ``synced_gpus``: an all-reduce per decoding step that waits for every rank, and so hangs when ranks
    make different numbers of ``generate()`` calls (prompts split unevenly). The marks are cleared while
    inside, where the modules are plain and local. All is undone on exit. The cost is one unsharded
    copy of the policy per rank while inside. FSDP2 gathers its units in place
    (:func:`ipo_lightning.fsdp2.local_forwards`). Other strategies (DDP, one process, ZeRO-1/2) hold
    full weights already: nothing is done. ZeRO-3 is not handled.

    Yields whether weights were gathered: if so, tensors read from them inside are freed on exit.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if fsdp2.is_fsdp2(strategy):
        with fsdp2.local_forwards(module or strategy.lightning_module) as gathered:
            yield gathered
        return
    root = strategy.model if isinstance(strategy, FSDPStrategy) else None
    if not isinstance(root, FSDP):
        yield False
        return
    with FSDP.summon_full_params(root, recurse=True, writeback=False):
        units = [
            (parent, name, child)
            for parent in root.module.modules()
            for name, child in parent.named_children()
            if isinstance(child, FSDP)
        ]
        for parent, name, unit in units:
            parent._modules[name] = unit.module  # plain assignment: no nn.Module bookkeeping to undo
        try:
            with fsdp2.fsdp_marks_cleared(root.module):
                yield True
        finally:
            for parent, name, unit in reversed(units):
                parent._modules[name] = unit


_FSDP_NAMES = ("fsdp", "fsdp_cpu_offload")
_DEEPSPEED_PREFIX = "deepspeed"


def check_strategy(strategy: Any) -> None:
    """Reject strategies that mishandle the frozen reference, with one message naming the option.

    ``strategy`` is the raw ``trainer.strategy`` value: a name, or a class path with init args.
    Lightning's own FSDP and DeepSpeed strategies break here (frozen and trainable weights in one
    flat parameter; ``zero.Init`` around ``from_pretrained``), so their names point to the configs.
    """
    if isinstance(strategy, str):
        if strategy in _FSDP_NAMES:
            raise ConfigError(
                f"trainer.strategy={strategy!r} would flatten the frozen reference with the policy; use "
                "--config configs/strategy/fsdp.yaml (ipo_lightning.distributed.PreferenceFSDPStrategy)"
            )
        if strategy.startswith(_DEEPSPEED_PREFIX):
            raise ConfigError(
                f"trainer.strategy={strategy!r} loads the models inside deepspeed.zero.Init; use --config "
                "configs/strategy/deepspeed_zero2.yaml or deepspeed_zero3.yaml "
                "(ipo_lightning.distributed.PreferenceDeepSpeedStrategy)"
            )
        return
    class_path = getattr(strategy, "class_path", None) or (
        strategy.get("class_path") if isinstance(strategy, dict) else None
    )
    if class_path is None and isinstance(strategy, DeepSpeedStrategy):
        class_path = f"{type(strategy).__module__}.{type(strategy).__qualname__}"
    if class_path and "DeepSpeed" in class_path.rsplit(".", 1)[-1]:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"trainer.strategy {class_path} needs the deepspeed package, which is not installed: "
                "pip install deepspeed"
            ) from None


def check_lora_strategy(strategy: Any, lora: Any) -> None:
    """Refuse a LoRA policy (``model.lora`` set) under DeepSpeed ZeRO-3, with one message naming both.

    ZeRO-3 keeps every weight in pieces across ranks, and the export merges the adapters into the base
    weights of the whole model (:func:`ipo_lightning.lora.merged_copy`), which it would see empty.
    FSDP and FSDP2 (gathered for the merge), ZeRO-2, DDP and one process merge whole weights.
    ``strategy`` is the raw ``trainer.strategy`` value (a name, a class path with init args, or a
    strategy object).
    """
    if lora is None or _deepspeed_stage(strategy) != 3:
        return
    raise ConfigError(
        "model.lora with trainer.strategy PreferenceDeepSpeedStrategy stage 3: ZeRO-3 holds the base "
        "weights in pieces, and the export merges the adapters into them; use --config "
        "configs/strategy/fsdp.yaml or configs/strategy/deepspeed_zero2.yaml"
    )


def check_on_policy_strategy(strategy: Any) -> None:
    """Refuse a strategy the on-policy methods cannot sample under, with one message naming it.

    Sampling runs ``generate()`` on each process's whole policy inside the training step. FSDP2 gathers
    the policy there (:func:`full_weights_for_local_forwards`); FSDP cannot (the training step runs
    inside its root unit's forward, where it refuses to gather), nor can DeepSpeed. ``strategy`` is the
    raw ``trainer.strategy`` value or the strategy object.
    """
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        name = type(strategy).__name__
    else:
        class_path = _field(strategy, "class_path")
        name = class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else ""
        if not ("FSDPStrategy" in name or "DeepSpeed" in name) or "FSDP2" in name:
            return
    raise ConfigError(
        f"trainer.strategy {name}: the on-policy methods sample with the whole policy on each process, "
        "which it cannot gather during a training step; use one device, ddp or "
        "configs/strategy/fsdp2.yaml"
    )


def _deepspeed_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed ``trainer.strategy`` (Lightning's default 2 when unset), else None."""
    if isinstance(strategy, DeepSpeedStrategy):
        return 3 if strategy.zero_stage_3 else 2
    class_path = _field(strategy, "class_path")
    if not isinstance(class_path, str) or "DeepSpeed" not in class_path.rsplit(".", 1)[-1]:
        return None
    init_args = _field(strategy, "init_args")
    stage = _field(init_args, "stage")
    if stage is None:  # a DeepSpeed config given as a mapping states the stage itself
        stage = _field(_field(_field(init_args, "config"), "zero_optimization"), "stage")
    return int(stage) if stage is not None else 2


def _field(node: Any, key: str) -> Any:
    """``node[key]`` of a mapping or a jsonargparse namespace; None when absent (or ``node`` is None)."""
    if node is None or isinstance(node, str):
        return None
    getter = getattr(node, "get", None)
    return getter(key) if callable(getter) else getattr(node, key, None)
