"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the policy and the frozen reference both sharded.

Use it by class path (``configs/strategy/fsdp2.yaml``). :class:`PreferenceFSDP2Strategy` is Lightning's
``ModelParallelStrategy`` used for FSDP2 alone, over every device (no tensor parallelism). After the
LightningModule's ``configure_model`` it shards each Hugging Face model the module holds
(:func:`shard_models`): every decoder layer (the model's no-split classes) is one unit, then the model
root. FSDP2 shards each parameter on its own, so frozen and trained weights never share a flat
parameter (FSDP1's problem, which makes :class:`~ipo_lightning.distributed.PreferenceFSDPStrategy` keep
the reference whole on every device): the reference is sharded too, and costs each device 1/W of its
size instead of a full copy. Its forwards gather layer by layer, as the policy's do.

What the other sharded strategies do, this one does the same way:

- checkpoints hold the full policy in one file written by rank 0, never the reference;
- the export gathers the full weights to rank 0 (:func:`full_state_dict`);
- the divergence monitor and the generation evaluation gather every unit's full weights once per
  measurement and then run local forwards (:func:`local_forwards`); so do the on-policy methods for
  each step's sampling, which FSDP cannot do.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from transformers import PreTrainedModel

from ipo_lightning.errors import ConfigError
from ipo_lightning.reference import REFERENCE_ATTRIBUTE

GatherDType = Literal["auto", "float32", "bfloat16", "float16"]
_AUTO_GATHER_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""``gather_dtype: auto`` by ``trainer.precision``; any other precision gathers the weights' own dtype."""

FSDP_MARK = "_is_fsdp_managed_module"
"""The attribute FSDP (1 and 2) sets on every module it manages; ``generate()`` reads it to sync ranks."""


class PreferenceFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all devices for a policy + frozen reference pair (module docstring).

    Checkpoints are one file in the layout one process writes (the full weights; the optimizer state
    keyed by each parameter's position in the optimizer, as ``Optimizer.state_dict`` keys it), so a
    checkpoint written here resumes on one process and one process's resumes here.

    Args:
        shard_reference: shard the separate reference model too (``model.reference: separate``); false
            keeps a whole copy on every device, which skips its per-layer gathers at the cost of memory.
        gather_dtype: the dtype weights are gathered and computed in (FSDP2's ``MixedPrecisionPolicy``
            ``param_dtype``; gradients are still reduced and stored in float32): ``auto`` is bfloat16
            under ``trainer.precision: bf16-mixed`` (half the bytes of float32 weights per gather;
            autocast runs the matmuls in bf16 anyway, but norms and embeddings then also compute from
            bf16 weights), float16 under ``16-mixed``, else the weights' own.
        process_group_backend: the ``torch.distributed`` backend (default: nccl on GPUs, gloo on CPUs).
        timeout: how long a collective may wait for the other ranks.
    """

    def __init__(
        self,
        shard_reference: bool = True,
        gather_dtype: GatherDType = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=False, process_group_backend=process_group_backend, timeout=timeout
        )
        self.shard_reference = shard_reference
        self.gather_dtype = gather_dtype

    def setup_environment(self) -> None:
        """One data-parallel mesh dimension over every process (Lightning's default would make it the
        number of nodes and put the devices of a node in tensor parallelism)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        """Shard the module's models (once: a later validate or test finds them sharded), then let
        Lightning move, convert and build the optimizer over the sharded parameters."""
        assert self.lightning_module is not None
        dtype = resolve_gather_dtype(self.gather_dtype, str(trainer.precision))
        shard_models(self.lightning_module, self.device_mesh["data_parallel"], self.shard_reference, dtype)
        super().setup(trainer)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0 (empty elsewhere), keyed by optimizer position."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = _plain(optimizer)
        if not optimizer.state:
            # Before its first step (a checkpoint at step 0) torch's gatherer would run a step with lr 0
            # to create the state, which Adam counts as a step; there is nothing to gather either.
            return optimizer.state_dict() if self.global_rank == 0 else {}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        if self.global_rank != 0:
            return {}
        position = {name: index for index, name in enumerate(self._parameter_names(optimizer))}
        return _rekeyed(state, position)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a full checkpoint into the sharded module (each rank keeps its shards) and optimizers.

        The reference's weights are never saved, so the file is checked for every key of the module's
        own state dict (policy, metrics) and then loaded without Lightning's strict check, which would
        ask for the reference's parameters too. Returns the rest of the checkpoint (loops, callbacks).
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        assert self.lightning_module is not None and self.model is not None
        path = Path(self.broadcast(checkpoint_path))
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        stored = checkpoint.pop("state_dict")
        if self.lightning_module.strict_loading:
            _check_keys(path, set(self.lightning_module.state_dict()), set(stored))
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, stored, options=options)
        saved_states = checkpoint.get("optimizer_states", [])
        if self.optimizers and len(saved_states) != len(self.optimizers):
            raise ConfigError(
                f"checkpoint {path} holds {len(saved_states)} optimizer states for {len(self.optimizers)} "
                "optimizers (a weights-only checkpoint cannot resume training)"
            )
        for optimizer, saved in zip(self.optimizers, saved_states, strict=False):
            optimizer = _plain(optimizer)
            _check_groups(path, optimizer, saved)
            if not saved["state"]:
                # No per-parameter state yet (plain SGD, or no step taken), which torch's loader cannot
                # place; the groups' settings are all there is.
                for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
                    group.update({key: value for key, value in saved_group.items() if key != "params"})
                continue
            name = dict(enumerate(self._parameter_names(optimizer)))
            set_optimizer_state_dict(self.model, optimizer, _rekeyed(saved, name), options=options)
        return checkpoint

    def _parameter_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """The module's name of each parameter of ``optimizer``, in the optimizer's order."""
        assert self.model is not None
        names = {id(param): name for name, param in self.model.named_parameters()}
        return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _check_keys(path: Path, expected: set[str], stored: set[str]) -> None:
    """Refuse a checkpoint whose weights are not the module's own (the reference's are never saved)."""
    for keys, what in (
        (expected - stored, "lacks {} of the module's weights"),
        (stored - expected, "holds {} weights the module has not"),
    ):
        if keys:
            raise ConfigError(
                f"checkpoint {path} {what.format(len(keys))}, e.g. {min(keys)}: it was written for another "
                "model"
            )


def _check_groups(path: Path, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Refuse an optimizer state whose parameter groups differ from the optimizer's, as
    ``Optimizer.load_state_dict`` does for one process."""
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    if sizes != saved_sizes:
        raise ConfigError(
            f"checkpoint {path}: its optimizer state has parameter groups of sizes {saved_sizes}, the "
            f"optimizer {sizes}: it was written with another optimizer set-up"
        )


def _plain(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a ``LightningOptimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


def _rekeyed(state: dict[str, Any], key: dict[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with each parameter's key (its name or position) mapped through ``key``."""
    return {
        "state": {key[param]: value for param, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [key[param] for param in group["params"]]} for group in state["param_groups"]
        ],
    }


def resolve_gather_dtype(gather_dtype: GatherDType, precision: str) -> torch.dtype | None:
    """The dtype of :class:`PreferenceFSDP2Strategy`'s ``gather_dtype`` under ``trainer.precision``
    (None: the weights' own)."""
    if gather_dtype == "auto":
        return _AUTO_GATHER_DTYPES.get(precision)
    return getattr(torch, gather_dtype)


def shard_models(
    module: nn.Module, mesh: Any, shard_reference: bool = True, gather_dtype: torch.dtype | None = None
) -> None:
    """``fully_shard`` every outermost Hugging Face model inside ``module``: each of its no-split layers
    (decoder layers) as a unit, then the model itself. Models already sharded are left as they are.

    With ``shard_reference`` false the reference (under ``module.reference``) is not sharded. A
    ``gather_dtype`` gathers and computes in that dtype, reducing gradients in float32.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    reduce_dtype = torch.float32 if gather_dtype is not None else None
    policy = MixedPrecisionPolicy(param_dtype=gather_dtype, reduce_dtype=reduce_dtype)

    for name, model in _outermost_models(module):
        if isinstance(model, FSDPModule):
            continue
        if not shard_reference and name.split(".", 1)[0] == REFERENCE_ATTRIBUTE:
            continue
        layer_classes = set(getattr(model, "_no_split_modules", None) or [])
        for layer in model.modules():
            if layer is not model and type(layer).__name__ in layer_classes:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
        # FSDP keeps a root's weights gathered from its forward to its backward; a frozen model (the
        # reference) has no backward, so its root would stay gathered for good: reshard it after forward.
        frozen = not any(param.requires_grad for param in model.parameters())
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)
        if frozen:
            model.register_forward_hook(_forget_forward_records)  # runs after FSDP's own post-forward


def _forget_forward_records(model: nn.Module, *unused: Any) -> None:
    """Drop what FSDP recorded of a frozen root's forward (a forward hook on it).

    FSDP appends each unit's forward to lists that the backward uses for prefetching and clears at its
    end. A frozen model never runs a backward, so without this its lists would grow by one entry per
    unit per forward for the whole run. Only the records go: the units stay as they are (resharding
    them here would break :func:`local_forwards`, which keeps them gathered).
    """
    state = model._get_fsdp_state()
    state._comm_ctx.post_forward_order.clear()
    for unit in state._state_ctx.all_states:
        for group in unit._fsdp_param_groups:
            group._post_forward_indices.clear()


def _outermost_models(module: nn.Module) -> Iterator[tuple[str, PreTrainedModel]]:
    """The Hugging Face models in ``module`` that no other Hugging Face model in it contains."""
    found: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
            yield name, sub


def is_fsdp2(strategy: Any) -> bool:
    """Whether ``strategy`` is this module's FSDP2 strategy."""
    return isinstance(strategy, PreferenceFSDP2Strategy)


def full_state_dict(trainer: L.Trainer, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of ``model`` on rank 0, in CPU memory; None elsewhere.

    Collective: every rank must call it (each weight is gathered from its shards).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if trainer.is_global_zero else None


@contextmanager
def local_forwards(module: nn.Module) -> Generator[bool, None, None]:
    """Inside: every FSDP2 unit in ``module`` holds its full weights and forwards run on this rank alone,
    so ranks may run different numbers of forwards and ``generate()`` calls.

    On entry every unit is gathered (``unshard``, a collective every rank must enter, in the same
    order) and told not to reshard after a forward, so later forwards find their weights in place and
    communicate nothing. FSDP's mark that ``generate()`` reads to sync every decoding step across ranks
    (:data:`FSDP_MARK`) is cleared, because with ranks generating apart that sync would hang. On exit
    every unit is resharded and the marks and resharding settings are put back as they were. A root
    that has not run a forward yet is set up on entry, as FSDP would in its first forward: set up
    inside, it would take the setting made for the local forwards for its own, reshard after every
    training forward from then on, and the backward's gathers would depend on how many local forwards
    each rank had run (2 processes measuring unevenly then training hit mismatched collectives).
    Costs one unsharded copy of the sharded models per rank while inside. Forwards inside must not need
    gradients: a backward would reduce-scatter, a collective.

    Yields whether any unit was gathered.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [sub for sub in module.modules() if isinstance(sub, FSDPModule)]
    if not units:
        yield False
        return
    inner = {id(sub) for unit in units for sub in unit.modules() if sub is not unit}
    for unit in units:
        if id(unit) not in inner:  # a root: settle its FSDP set-up now, not in a forward inside
            unit._get_fsdp_state()._lazy_init()
    settings = [_resharding(unit) for unit in units]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        with fsdp_marks_cleared(module):
            yield True
    finally:
        for unit, setting in zip(units, settings, strict=True):
            _restore_resharding(unit, setting)
            unit.reshard()


@contextmanager
def fsdp_marks_cleared(module: nn.Module) -> Generator[None, None, None]:
    """Inside: no submodule of ``module`` carries FSDP's :data:`FSDP_MARK`, from which ``generate()``
    syncs every decoding step across ranks (which hangs when ranks generate apart); restored on exit."""
    marked = [sub for sub in module.modules() if getattr(sub, FSDP_MARK, False)]
    for sub in marked:
        setattr(sub, FSDP_MARK, False)
    try:
        yield
    finally:
        for sub in marked:
            setattr(sub, FSDP_MARK, True)


def _resharding(unit: Any) -> tuple[bool, list[Any]]:
    """A unit's resharding setting: FSDP's automatic root choice and each parameter group's post-forward
    mesh (None: keep the full weights after a forward). ``set_reshard_after_forward`` overwrites both,
    and FSDP2 has no public getter."""
    state = unit._get_fsdp_state()
    return state._auto_reshard_after_forward, [
        group.post_forward_mesh_info for group in state._fsdp_param_groups
    ]


def _restore_resharding(unit: Any, setting: tuple[bool, list[Any]]) -> None:
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward, meshes = setting
    for group, mesh_info in zip(state._fsdp_param_groups, meshes, strict=True):
        group.post_forward_mesh_info = mesh_info
