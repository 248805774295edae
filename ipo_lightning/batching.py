"""How a pairwise batch is laid out for the model: padded rows, padding-free packs, or shared prompts.

The collator always produces ``2B`` right-padded rows (prompt + chosen rows, then prompt + rejected
rows). :func:`build_layout` rearranges them, per step, into what the model actually runs on:

- ``padded``: the rows as they are, with their 2D attention mask.
- ``padding_free``: the sequences' real tokens concatenated, ``position_ids`` restarting at 0 for
  each sequence and no attention mask, so no compute is spent on padding. transformers 5.x derives a
  block-diagonal causal mask from the restarting positions, but only with ``use_cache=False`` (with a
  cache, packed sequences silently attend to each other); the forward here always passes it. With
  ``flash_attention_2``/``_3`` everything goes into one row, in the collator's order (the varlen
  kernel's cost grows with each sequence's own length), and the forward also gets the sequence
  boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``) exactly as transformers'
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` builds them, so the kernel never
  attends across two sequences. With sdpa/eager a mask over one row of all tokens costs attention
  quadratic in the *total* length, so sequences are packed first-fit-decreasing into rows no wider than the
  longest sequence: never more attention work than the padded batch, and less padding. Models whose
  layers mix tokens outside attention (linear attention, state-space, convolution) would carry state
  across packed sequences: :mod:`ipo_lightning.packing_safety` refuses them this layout and the next.
- ``prefix_shared``: one row per pair, ``[prompt, chosen, rejected]``; the rejected tokens see the
  prompt but not the chosen tokens, and their positions restart after the prompt, through a 4D mask
  (bool for sdpa; additive float for eager, which mishandles bool masks). The prompt runs once per
  pair instead of twice. The rejected completion's first token is predicted by the prompt's last
  position, the same position that predicts the chosen completion's first token. flash-attention
  takes no 4D mask (and its varlen boundaries cannot hide the chosen tokens, which sit between the
  prompt and the rejected ones), so ``prefix_shared`` with it is refused at start-up.

``auto`` (the default of ``model.batching``) is resolved once at start-up by
:func:`resolve_batching` to the fastest of these the models and their attention kernel support:
``prefix_shared`` with sdpa/eager (or transformers' default kernel, one of the two),
``padding_free`` with flash-attention, ``padded`` otherwise and for a model whose forward takes no
``position_ids``.

Every layout says where each completion token's log-prob sits in the model's output. The one forward
of every completion score is :func:`layout_logits`: it asks the model for logits only where a
completion token is predicted (``logits_to_keep``: an int window for padded rows, per-row position
indices otherwise) and returns them as :class:`KeptLogits`, whose scored positions come out in one
canonical order (sequence 0's completion tokens, then sequence 1's, ...; sequences in the collator's
row order). :meth:`KeptLogits.scores` turns them into per-token log-probs in that order, per-sequence
sums and token counts (the chunked float32 kernel of :mod:`ipo_lightning.logprobs`), equal across
layouts up to float rounding (tests check 1e-5 in float32). Training (policy and model-backed
references), the precompute pass (:mod:`ipo_lightning.precompute`) and the divergence measurement
(:mod:`ipo_lightning.divergence.measure`, which needs the full-vocabulary logits) all score this way.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ipo_lightning.errors import ConfigError
from ipo_lightning.logprobs import token_logprobs
from ipo_lightning.packing_safety import packing_unsafe_reason

Batching = Literal["padded", "padding_free", "prefix_shared"]
BATCHING_CHOICES: tuple[str, ...] = get_args(Batching)
BatchingOption = Literal["auto", "padded", "padding_free", "prefix_shared"]
"""What ``model.batching`` accepts: a layout, or ``auto`` (see :func:`resolve_batching`)."""
BATCHING_OPTIONS: tuple[str, ...] = get_args(BatchingOption)
# prefix_shared needs a dense 4D mask: flash_attention_2 takes none, and flex_attention wants a
# BlockMask (a 4D tensor through it crashed the process) and has no CPU backward in torch 2.13.
PREFIX_SHARED_ATTENTION = ("sdpa", "eager")
SINGLE_ROW_ATTENTION = ("flash_attention_2", "flash_attention_3")


def single_row_layout(batching: str | None) -> Batching:
    """The layout rows that are not pairs (sampled completions, retention texts) are scored in, for a
    run's resolved ``model.batching``: ``padding_free`` when the run uses it, else ``padded``
    (``prefix_shared`` has no shared prompt to lay out; ``auto`` or none: the layout every model runs)."""
    return "padding_free" if batching == "padding_free" else "padded"


@dataclass(frozen=True)
class RowLayout:
    """Model inputs of one batch in one batching mode, and where to read each completion token's score.

    ``keep`` is passed as ``logits_to_keep``: the model returns logits ``[R, K, V]`` and
    ``labels[r, k]`` is the token that ``logits[r, k]`` is scored against. ``scored`` indexes the
    flattened ``[R * K]`` token log-probs in canonical order; ``sequence_ids`` names the sequence (the
    collator's row) each of them belongs to.
    """

    input_ids: Tensor
    """[R, W] token ids of the rows the model runs on."""
    attention_mask: Tensor | None
    """[R, W] padding mask, [R, 1, W, W] 4D mask, or None (padding-free)."""
    position_ids: Tensor | None
    """[R, W] positions, or None for the model's default ``arange``."""
    keep: int | Tensor
    """``logits_to_keep``: a trailing window (int) or per-row positions ([R, K] long)."""
    labels: Tensor
    """[R, K] the token each kept logit is scored against (dummy 0 where unused)."""
    scored: Tensor
    """[M] indices into the flattened [R * K] scores, in canonical order."""
    sequence_ids: Tensor
    """[M] the sequence (collator row, 0..N-1) of each scored token, non-decreasing."""
    num_sequences: int
    """N, the collator's row count (2B)."""
    row_mask: Tensor | None = None
    """[R, K] bool when the rows are the sequences (padded): each row is then summed in place, a
    masked sum over the row (no scatter)."""
    flash_kwargs: dict[str, Tensor | int] | None = None
    """The single packed row's sequence boundaries for flash-attention's varlen kernel
    (``cu_seq_lens_q/k``: int32 cumulative lengths, ``max_length_q/k``: the longest, an int), as
    transformers' ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives them."""


@dataclass(frozen=True)
class SequenceScores:
    """Completion log-probs of N sequences, in the collator's row order (chosen rows, then rejected)."""

    sums: Tensor
    """[N] float32 summed completion-token log-probs."""
    counts: Tensor
    """[N] long number of scored completion tokens."""
    token_logps: Tensor
    """[M] float32 per-token log-probs, sequence by sequence (see :class:`RowLayout`)."""
    sequence_ids: Tensor
    """[M] the sequence each entry of ``token_logps`` belongs to."""

    def sequence_logps(self, length_normalize: bool) -> Tensor:
        """[N] sums, or means over completion tokens with ``length_normalize``."""
        return sequence_logps(self.sums, self.counts, length_normalize=length_normalize)


def sequence_logps(sums: Tensor, counts: Tensor, *, length_normalize: bool) -> Tensor:
    """Per-sequence log-probs from summed token log-probs: the sums, or with ``length_normalize`` their
    means over the scored tokens (a sequence with none counts as one, so it scores 0, not NaN)."""
    if not length_normalize:
        return sums
    return sums / counts.clamp(min=1).to(sums.dtype)


# ---------------------------------------------------------------------------------------- checks


def _forward_parameters(model: nn.Module | type[nn.Module]) -> set[str]:
    """Named parameters of a model's (or model class's) forward, looking through a PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(inner.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _takes_keyword_arguments(model: nn.Module) -> bool:
    """Whether a model's forward (through a PEFT wrapper) takes ``**kwargs``, as transformers' models do."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        parameters = inspect.signature(inner.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)


def check_batching_option(batching: str, attn_implementation: str | None) -> None:
    """Start-up check of ``model.batching`` against ``model.attn_implementation`` (one ConfigError)."""
    if batching not in BATCHING_OPTIONS:
        raise ConfigError(f"model.batching must be one of {', '.join(BATCHING_OPTIONS)}, got {batching!r}")
    if batching == "prefix_shared" and attn_implementation is not None:
        if attn_implementation not in PREFIX_SHARED_ATTENTION:
            raise ConfigError(
                f"model.batching=prefix_shared needs a 4D attention mask, which "
                f"model.attn_implementation={attn_implementation!r} cannot take; use sdpa or eager, "
                "or model.batching padding_free"
            )


def check_packing_safe(batching: str, name: str, config: object) -> None:
    """Refuse ``padding_free`` / ``prefix_shared`` for a model whose layers would mix packed sequences.

    Args:
        batching: the (resolved) ``model.batching``.
        name: how the message names the model (its path or class).
        config: its ``PretrainedConfig`` (see :func:`~ipo_lightning.packing_safety.packing_unsafe_reason`).

    Raises:
        ConfigError: naming ``model.batching``, the model and the layer kind found.
    """
    if batching == "padded" or config is None:
        return
    reason = packing_unsafe_reason(config)
    if reason is not None:
        raise _packing_error(batching, name, reason)


def _packing_error(batching: str, name: str, reason: str) -> ConfigError:
    return ConfigError(
        f"model.batching={batching}: {name} cannot run packed rows: {reason}; use model.batching padded "
        "(auto picks it for this model)"
    )


def check_model_batching(model: nn.Module, batching: str) -> None:
    """Check a loaded model can run ``batching`` (its forward takes ``position_ids``, its attention fits,
    its layers keep packed sequences apart).

    Raises:
        ConfigError: naming ``model.batching`` and what the model lacks.
    """
    if batching == "padded":
        return
    check_packing_safe(batching, type(model).__name__, getattr(model, "config", None))
    if "position_ids" not in _forward_parameters(model):
        raise ConfigError(
            f"model.batching={batching}: {type(model).__name__}.forward takes no position_ids, which "
            "packed and prefix-shared rows need; use model.batching padded"
        )
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    check_batching_option(batching, attn)


@dataclass(frozen=True)
class BatchingTarget:
    """A model that will run the training layout: what :func:`resolve_batching` needs to know of it."""

    name: str
    """How the log line names it (its path or hub id)."""
    model_class: type[nn.Module] | None
    """Its class; None when its config does not say which class it is."""
    attention: str | None
    """Its attention kernel; None: transformers' default for the class (sdpa, else eager)."""
    packing_unsafe: str | None = None
    """Why its layers would mix packed sequences (:func:`packing_unsafe_reason`); None: they do not."""


def _supported_layouts(target: BatchingTarget) -> tuple[tuple[Batching, ...], str]:
    """The layouts a model can run, best first, and why it cannot run the others."""
    if target.packing_unsafe is not None:
        return ("padded",), f"it cannot run packed rows: {target.packing_unsafe}"
    if target.model_class is None:
        return ("padded",), "its config names no causal-LM class whose forward could be checked"
    if "position_ids" not in _forward_parameters(target.model_class):
        return ("padded",), f"{target.model_class.__name__}.forward takes no position_ids"
    attention = target.attention
    if attention is None or attention in PREFIX_SHARED_ATTENTION:
        kernel = "transformers' default attention (sdpa or eager)" if attention is None else attention
        return ("prefix_shared", "padding_free", "padded"), f"{kernel} takes the 4D prefix-sharing mask"
    if attention in SINGLE_ROW_ATTENTION:
        return ("padding_free", "padded"), f"{attention} takes no 4D mask, but packs rows without padding"
    return ("padded",), f"attention {attention!r} is not known to run packed or prefix-shared rows exactly"


def resolve_batching(batching: str, targets: Sequence[BatchingTarget]) -> Batching:
    """The layout ``model.batching`` stands for: itself, or for ``auto`` the best one all ``targets`` run.

    ``auto`` prefers ``prefix_shared`` (sdpa/eager: the prompt runs once per pair), then
    ``padding_free`` (flash-attention: no padding), then ``padded`` (any model). Every candidate gives
    the same log-probs, so the choice is one of speed only. It is logged as one INFO line naming
    the deciding model and why. ``targets`` are the models that run the layout during training (the
    policy, and a separately loaded reference).

    Raises:
        ConfigError: an explicit ``padding_free`` or ``prefix_shared`` for a target whose layers would
            mix packed sequences (:attr:`BatchingTarget.packing_unsafe`).
    """
    if batching != "auto":
        if batching != "padded":
            for target in targets:
                if target.packing_unsafe is not None:
                    raise _packing_error(batching, target.name, target.packing_unsafe)
        return batching  # type: ignore[return-value]  # checked by check_batching_option
    supported = [(target, *_supported_layouts(target)) for target in targets]
    for layout in ("prefix_shared", "padding_free", "padded"):
        if all(layout in layouts for _, layouts, _ in supported):
            break
    # The deciding model: the first whose best layout is the one chosen (the most limited one).
    target, _, reason = next(item for item in supported if item[1][0] == layout)
    rank_zero_info(f"model.batching=auto: {layout} for {target.name} ({reason})")
    return layout  # type: ignore[return-value]


# --------------------------------------------------------------------------------------- layouts


def _spans(attention_mask: Tensor, completion_mask: Tensor) -> tuple[list[int], list[int]]:
    """Per row: its length (real tokens) and where its completion starts (its length if none)."""
    lengths = attention_mask.sum(dim=1)
    has_completion = completion_mask.any(dim=1)
    starts = torch.where(has_completion, completion_mask.int().argmax(dim=1), lengths)
    return lengths.tolist(), starts.tolist()


def _padded_layout(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> RowLayout:
    # Logits from the batch's first completion token on: the ones before it are never needed. The
    # window's last logit predicts nothing; it gets a dummy label that the row mask excludes, rather
    # than being sliced off (a non-contiguous view, which the chunked kernel would copy whole).
    seq_len = input_ids.shape[1]
    has_completion = completion_mask.any(dim=1)
    first_positions = completion_mask.int().argmax(dim=1)[has_completion]
    first = int(first_positions.min()) if first_positions.numel() else seq_len - 1
    first = max(first, 1)  # token 0 has no preceding logit to predict it
    keep = seq_len - first + 1
    dummy = torch.zeros_like(input_ids[:, :1])
    labels = torch.cat([input_ids[:, first:], dummy], dim=1)
    row_mask = torch.cat([completion_mask[:, first:], dummy.bool()], dim=1)
    scored = row_mask.reshape(-1).nonzero().squeeze(-1)
    return RowLayout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=None,
        keep=keep,
        labels=labels,
        scored=scored,
        sequence_ids=torch.div(scored, keep, rounding_mode="floor"),
        num_sequences=input_ids.shape[0],
        row_mask=row_mask,
    )


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most ``capacity`` (deterministic)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        for index, free in enumerate(room):
            if lengths[row] <= free:
                bins[index].append(row)
                room[index] -= lengths[row]
                break
        else:
            bins.append([row])
            room.append(capacity - lengths[row])
    return bins


class _KeptPositions:
    """Accumulates, per output row, the positions whose logits are kept and the labels they score."""

    def __init__(self, rows: int) -> None:
        self.positions: list[list[Tensor]] = [[] for _ in range(rows)]
        self.labels: list[list[Tensor]] = [[] for _ in range(rows)]
        self.used = [0] * rows
        self.slots: list[tuple[int, Tensor]] = []  # (row, slot indices) in canonical order
        self.sequence_ids: list[Tensor] = []

    def add(self, row: int, positions: Tensor, labels: Tensor, sequence: int) -> None:
        count = positions.numel()
        self.positions[row].append(positions)
        self.labels[row].append(labels)
        self.slots.append((row, torch.arange(self.used[row], self.used[row] + count)))
        self.sequence_ids.append(torch.full((count,), sequence, dtype=torch.long))
        self.used[row] += count

    def finish(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(keep [R, K], labels [R, K], scored [M], sequence_ids [M])``; unused slots keep position 0."""
        width = max(max(self.used), 1)
        keep = torch.zeros((len(self.used), width), dtype=torch.long)
        labels = torch.zeros((len(self.used), width), dtype=torch.long)
        for row, (positions, row_labels) in enumerate(zip(self.positions, self.labels, strict=True)):
            if positions:
                keep[row, : self.used[row]] = torch.cat(positions)
                labels[row, : self.used[row]] = torch.cat(row_labels)
        empty = torch.zeros(0, dtype=torch.long)
        scored = torch.cat([row * width + slots for row, slots in self.slots]) if self.slots else empty
        sequence_ids = torch.cat(self.sequence_ids) if self.sequence_ids else empty
        return keep.to(device), labels.to(device), scored.to(device), sequence_ids.to(device)


def _scored_positions(completion_row: Tensor, length: int) -> Tensor:
    """Row positions of completion tokens that have a predicting position (token 0 has none)."""
    positions = completion_row[:length].nonzero().squeeze(-1)
    return positions[positions >= 1]


def _padding_free_layout(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *, single_row: bool
) -> RowLayout:
    device = input_ids.device
    lengths, _ = _spans(attention_mask, completion_mask)
    if single_row:  # the sequences in the collator's order, as DataCollatorWithFlattening concatenates them
        bins = [list(range(len(lengths)))]
    else:
        bins = _first_fit_decreasing(lengths, max(max(lengths), 1))
    width = max(max(sum(lengths[r] for r in rows) for rows in bins), 1)
    ids_cpu, completion_cpu = input_ids.cpu(), completion_mask.cpu()
    packed = torch.zeros((len(bins), width), dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    offsets: dict[int, tuple[int, int]] = {}
    for b, rows in enumerate(bins):
        offset = 0
        for row in rows:
            length = lengths[row]
            packed[b, offset : offset + length] = ids_cpu[row, :length]
            positions[b, offset : offset + length] = torch.arange(length)
            offsets[row] = (b, offset)
            offset += length
        # The tail is its own pseudo-sequence (positions restart at 0): nothing real attends to it.
        positions[b, offset:] = torch.arange(width - offset)
    kept = _KeptPositions(len(bins))
    for row in range(len(lengths)):  # canonical order: the collator's rows
        b, offset = offsets[row]
        targets = _scored_positions(completion_cpu[row], lengths[row])
        kept.add(b, offset + targets - 1, ids_cpu[row, targets], row)
    keep, labels, scored, sequence_ids = kept.finish(device)
    flash_kwargs = None
    if single_row:
        # Passed explicitly, the varlen kernel gets the boundaries without inferring them from the
        # positions in every layer (a device sync each), and never attends across two sequences.
        boundaries = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        longest = max(lengths)
        flash_kwargs = {
            "cu_seq_lens_q": boundaries,
            "cu_seq_lens_k": boundaries,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    return RowLayout(
        input_ids=packed.to(device),
        attention_mask=None,
        position_ids=positions.to(device),
        keep=keep,
        labels=labels,
        scored=scored,
        sequence_ids=sequence_ids,
        num_sequences=len(lengths),
        flash_kwargs=flash_kwargs,
    )


def _prefix_shared_layout(
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    float_mask_dtype: torch.dtype | None,
) -> RowLayout:
    device = input_ids.device
    rows = input_ids.shape[0]
    if rows % 2:
        raise ValueError(f"prefix_shared needs 2B rows (chosen then rejected), got {rows}")
    pairs = rows // 2
    lengths, starts = _spans(attention_mask, completion_mask)
    ids_cpu, completion_cpu = input_ids.cpu(), completion_mask.cpu()
    spans = []
    for i in range(pairs):
        prompt = starts[i]
        if starts[pairs + i] != prompt or not torch.equal(ids_cpu[i, :prompt], ids_cpu[pairs + i, :prompt]):
            raise ValueError(f"prefix_shared: pair {i}: chosen and rejected rows do not share their prompt")
        for row in (i, pairs + i):
            if int(completion_cpu[row].sum()) != lengths[row] - prompt:
                raise ValueError(f"prefix_shared: row {row}: the completion is not the end of the row")
        spans.append((prompt, lengths[i] - prompt, lengths[pairs + i] - prompt))
    width = max(max(p + c + r for p, c, r in spans), 1)
    packed = torch.zeros((pairs, width), dtype=torch.long)
    positions = torch.zeros((pairs, width), dtype=torch.long)
    # Segment of every column: 0 prompt, 1 chosen, 2 rejected, 3 padding.
    segment = torch.full((pairs, width), 3, dtype=torch.long)
    for i, (p, c, r) in enumerate(spans):
        packed[i, : p + c] = ids_cpu[i, : p + c]
        packed[i, p + c : p + c + r] = ids_cpu[pairs + i, p : p + r]
        positions[i, : p + c] = torch.arange(p + c)
        positions[i, p + c : p + c + r] = torch.arange(p, p + r)
        segment[i, :p], segment[i, p : p + c], segment[i, p + c : p + c + r] = 0, 1, 2
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    # Padding queries attend causally too (they see at least themselves, so no NaN); nothing reads them.
    rejected_sees_chosen = (segment[:, :, None] == 2) & (segment[:, None, :] == 1)
    allowed = (causal[None] & ~rejected_sees_chosen)[:, None]
    if float_mask_dtype is None:
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape, dtype=float_mask_dtype)
        mask.masked_fill_(~allowed, torch.finfo(float_mask_dtype).min)
    kept = _KeptPositions(pairs)
    for side in (1, 2):  # chosen sequences first, then rejected: the collator's row order
        for i, (p, c, r) in enumerate(spans):
            if side == 1:
                targets = torch.arange(max(p, 1), p + c)
                predictors = targets - 1
            else:
                targets = torch.arange(p + c + (0 if p >= 1 else 1), p + c + r)
                predictors = targets - 1
                if p >= 1 and r:
                    predictors[0] = p - 1  # the prompt's last position predicts the first rejected token
            kept.add(i, predictors, packed[i, targets], i if side == 1 else pairs + i)
    keep, labels, scored, sequence_ids = kept.finish(device)
    return RowLayout(
        input_ids=packed.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        keep=keep,
        labels=labels,
        scored=scored,
        sequence_ids=sequence_ids,
        num_sequences=rows,
    )


def build_layout(
    batching: Batching,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    attn_implementation: str | None = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> RowLayout:
    """Lay out the collator's right-padded rows for one forward in mode ``batching``.

    Args:
        batching: ``padded``, ``padding_free`` or ``prefix_shared`` (see module docstring).
        input_ids: [N, T] right-padded rows (prompt + completion), for prefix_shared N = 2B rows
            (chosen rows then rejected rows of the same pairs).
        attention_mask: [N, T] 1 on real tokens.
        completion_mask: [N, T] True at completion tokens.
        attn_implementation: the model's attention kernel (decides packing width and mask type).
        dtype: the model's compute dtype, for the additive float mask of eager attention.
    """
    if batching == "padded":
        return _padded_layout(input_ids, attention_mask, completion_mask)
    if batching == "padding_free":
        single_row = attn_implementation in SINGLE_ROW_ATTENTION
        return _padding_free_layout(input_ids, attention_mask, completion_mask, single_row=single_row)
    if batching == "prefix_shared":
        float_dtype = None if attn_implementation == "sdpa" else dtype
        return _prefix_shared_layout(input_ids, attention_mask, completion_mask, float_mask_dtype=float_dtype)
    raise ValueError(f"unknown batching {batching!r}; expected one of {', '.join(BATCHING_CHOICES)}")


# --------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class KeptLogits:
    """The model's logits at a layout's kept positions, and where the scored ones sit.

    ``logits`` are what the forward returned (``[R, K, V]``, nothing copied). The scored positions,
    in canonical order, are ``logits.reshape(R * K, V)[layout.scored]``: :meth:`scored` copies them
    out, :meth:`scored_chunks` yields them a chunk at a time (one chunk copied at a time).
    """

    logits: Tensor
    """[R, K, V] the model's logits at the kept positions."""
    layout: RowLayout
    """The layout they were computed on."""

    def _flat(self) -> Tensor:
        return self.logits.reshape(-1, self.logits.shape[-1])

    def scored(self) -> Tensor:
        """[M, V] logits of the scored positions in canonical order (a copy)."""
        return self._flat().index_select(0, self.layout.scored)

    def scored_chunks(self, chunk_size: int) -> Iterator[Tensor]:
        """The rows of :meth:`scored`, ``chunk_size`` at a time."""
        flat, scored = self._flat(), self.layout.scored
        for start in range(0, scored.numel(), chunk_size):
            yield flat.index_select(0, scored[start : start + chunk_size])

    def labels(self) -> Tensor:
        """[M] the token each scored position is scored against, in canonical order."""
        return self.layout.labels.reshape(-1)[self.layout.scored]

    def scores(self, *, chunk_size: int = 1024) -> SequenceScores:
        """The completion log-probs of these logits (chunked float32 log-softmax, see logprobs.py)."""
        layout = self.layout
        per_slot = token_logprobs(self.logits, layout.labels, chunk_size=chunk_size)
        token_logps = per_slot.reshape(-1)[layout.scored]
        if layout.row_mask is not None:
            sums = (per_slot * layout.row_mask.to(per_slot.dtype)).sum(dim=-1)
        else:
            sums = token_logps.new_zeros(layout.num_sequences).index_add(0, layout.sequence_ids, token_logps)
        counts = torch.bincount(layout.sequence_ids, minlength=layout.num_sequences)
        return SequenceScores(
            sums=sums, counts=counts, token_logps=token_logps, sequence_ids=layout.sequence_ids
        )


def layout_logits(model: nn.Module, layout: RowLayout) -> KeptLogits:
    """Run ``model`` once on ``layout``: logits at its kept positions only (``logits_to_keep``).

    The one forward through which every completion score is computed: training (policy and
    model-backed references), the precompute pass and the divergence monitor.
    """
    inputs = {"input_ids": layout.input_ids, "attention_mask": layout.attention_mask, "use_cache": False}
    if layout.position_ids is not None:
        inputs["position_ids"] = layout.position_ids
    if layout.flash_kwargs is not None and _takes_keyword_arguments(model):
        # Forwarded by transformers to every attention call (FlashAttentionKwargs); a forward without
        # **kwargs leaves flash-attention to infer the same boundaries from the restarting positions.
        inputs.update(layout.flash_kwargs)
    if "logits_to_keep" in _forward_parameters(model):
        return KeptLogits(model(**inputs, logits_to_keep=layout.keep).logits, layout)
    logits = model(**inputs).logits  # older models: every position, then a (copying) selection
    if isinstance(layout.keep, int):
        kept = logits[:, -layout.keep :] if layout.keep < logits.shape[1] else logits
    else:
        kept = torch.take_along_dim(logits, layout.keep[..., None], dim=1)
    return KeptLogits(kept, layout)


def model_attention(model: nn.Module) -> str | None:
    """The attention kernel a loaded model runs (``config._attn_implementation``)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def model_layout(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, batching: Batching
) -> RowLayout:
    """:func:`build_layout` for ``model``'s attention kernel and compute dtype."""
    weight = next(model.parameters(), None)
    return build_layout(
        batching,
        input_ids,
        attention_mask,
        completion_mask,
        attn_implementation=model_attention(model),
        dtype=torch.float32 if weight is None else weight.dtype,
    )


def batch_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    batching: Batching = "padded",
) -> KeptLogits:
    """The collator's rows laid out for ``model`` in mode ``batching``, run once: its kept logits."""
    return layout_logits(model, model_layout(model, input_ids, attention_mask, completion_mask, batching))


def batch_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    batching: Batching = "padded",
    chunk_size: int = 1024,
) -> SequenceScores:
    """Score the collator's rows with ``model`` in mode ``batching`` (layout built for this model)."""
    kept = batch_logits(model, input_ids, attention_mask, completion_mask, batching=batching)
    return kept.scores(chunk_size=chunk_size)
