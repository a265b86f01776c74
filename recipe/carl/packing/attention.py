"""Tree attention for packed rows in a Hugging Face causal LM: masks, position ids and predecessor logits.

No verl here (the engine in `recipe.carl.packing.engine` calls these), so the tests run them on a bare model.

A packed row (`recipe.carl.packing.layout`) needs three things a per-path row does not:

1. **position ids** along each token's own path (`compute_tree_layout`);
2. **an attention mask** from `span_end` (k is visible to q iff k <= q < span_end[k]), in the form the model's
   attention implementation takes: a dense boolean mask for `sdpa`, an additive float mask for `eager` (both
   O(T^2) memory: CPU and tests), a `BlockMask` for `flex_attention` (GPU: blocks that are fully masked, i.e.
   other branches, are skipped, and nothing T x T is ever stored). flash-attn's varlen kernels take only
   contiguous causal segments, which cannot express one branch seeing its ancestors but not its siblings;
   `flash_attention_*` is refused with the setting to change;
3. **logits taken at each token's predecessor**: in a packed row the token before a branch's first token is the
   last token of the shared prefix, not the previous column. verl scores token t + 1 with the logits at column t,
   so a forward pre-hook on the LM head gathers, for each column t, the hidden state of the predecessor of the
   token at t + 1 (`source`). verl's own log-prob and entropy code then runs unchanged; gathering hidden states
   (T x d) rather than logits (T x vocab) keeps the cost negligible, and the backward pass sums the gradients of a
   shared prefix's last token over its branches, as it should.

Compilation (`dynamic_lengths`): every packed micro-batch has its own length, and flex attention and its compiled
block mask must not be compiled once per length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch._dynamo

from recipe.carl.packing import tree_attention_problem
from recipe.carl.packing.layout import compute_tree_attention_mask, compute_tree_layout

BLOCK_MASK_TENSORS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)
"""A `BlockMask`'s tensors: (batch, heads, query blocks[, kv blocks])."""


def layout_rows(
    runs: Sequence[Sequence[Sequence[int]] | None], lengths: Sequence[int]
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Position ids, subtree ends and predecessors of a micro-batch's rows (plain causal rows where runs is None).

    Args:
        runs: each row's runs (`PackedRow.tree_runs`), or None for an ordinary row [len: bs].
        lengths: each row's number of tokens, prompt + response [len: bs].

    Returns:
        position ids of all rows back to back [shape: (sum(lengths),)], and per row its span ends and
        predecessors in row-local columns [shapes: (lengths[i],)].

    Raises:
        ValueError: when a row's runs do not add up to its length.
    """
    positions, span_ends, predecessors = [], [], []
    for i, (row_runs, n) in enumerate(zip(runs, lengths, strict=True)):
        if row_runs is None:
            cols = np.arange(n, dtype=np.int64)
            pos, end, pred = cols, np.full(n, n, dtype=np.int64), cols - 1
        else:
            pos, end, pred = compute_tree_layout(row_runs)
            if len(pos) != n:
                raise ValueError(f"row {i} has {n} tokens but its runs describe {len(pos)}: the row was changed.")
        positions.append(pos)
        span_ends.append(end)
        predecessors.append(pred)
    return np.concatenate(positions), span_ends, predecessors


def to_model_layout(
    span_ends: Sequence[np.ndarray], predecessors: Sequence[np.ndarray], width: int, packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`span_end` and the logits `source` in the layout the model sees.

    Args:
        span_ends, predecessors: per row, row-local (`layout_rows`).
        width: columns of the model input: the padded row length, or the packed length (with any padding).
        packed: True for verl's remove-padding layout (all rows in one sequence of `width` tokens), False for
            right-padded rows.

    Returns:
        span_end and source [shapes: (bs or 1, width)]. Padding columns see only themselves; `source[t]` is the
        column whose hidden state predicts the token at t + 1 (t itself at a row's last token and on padding).
    """
    rows = 1 if packed else len(span_ends)
    cols = np.arange(width, dtype=np.int64)
    span_end = np.tile(cols + 1, (rows, 1))
    source = np.tile(cols, (rows, 1))
    offset = 0
    for b, (end, pred) in enumerate(zip(span_ends, predecessors, strict=True)):
        r, n = (0, offset) if packed else (b, 0)
        span_end[r, n : n + len(end)] = end + n
        nxt = pred[1:]  # predecessor of the token at t + 1, for t = 0 .. len - 2
        source[r, n : n + len(nxt)] = np.where(nxt >= 0, nxt + n, cols[n : n + len(nxt)])
        offset += len(end)
    return torch.from_numpy(span_end), torch.from_numpy(source)


def build_attention_mask(span_end: torch.Tensor, attn_implementation: str, dtype: torch.dtype = torch.float32) -> Any:
    """The tree mask in the form `attn_implementation` takes (transformers passes 4D masks through as they are).

    Args:
        span_end: [shape: (bs, T)].
        attn_implementation: the model's `config._attn_implementation`.
        dtype: dtype of the additive mask for `eager`.

    Returns:
        `sdpa`: bool (bs, 1, T, T); `eager`: float (bs, 1, T, T), 0 or the dtype's minimum; `flex_attention`: a
        `BlockMask` evaluated on span_end's device, its block dimensions marked dynamic for `torch.compile`.

    Raises:
        ValueError: for an attention implementation that cannot take a tree mask, naming the setting.
    """
    if attn_implementation in ("sdpa", "eager"):
        mask = compute_tree_attention_mask(span_end)[:, None]
        if attn_implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def tree_mask(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return (kv <= q) & (q < span_end[b, kv])

        bs, length = span_end.shape
        # compiled on a GPU, as transformers builds its own block masks: then no T x T mask is ever materialised;
        # without grad in both passes, so that the update pass does not compile it again (dynamo guards the grad mode)
        with torch.no_grad():
            mask = create_block_mask(
                tree_mask, bs, None, length, length, device=span_end.device, _compile=span_end.is_cuda
            )
        # the block counts change with the length too: dynamo would compile flex attention for the first count
        # (it keeps these static even under `dynamic_lengths`), then again for a dynamic one
        for name in BLOCK_MASK_TENSORS:
            part = getattr(mask, name, None)
            if isinstance(part, torch.Tensor):
                for dim in range(2, part.dim()):
                    torch._dynamo.maybe_mark_dynamic(part, dim)
        return mask
    raise ValueError(
        f"algorithm.carl.packing=tree needs {tree_attention_problem(attn_implementation, span_end.device.type)}."
    )


@contextmanager
def dynamic_lengths() -> Iterator[None]:
    """Within the block, `torch.compile` treats every size as dynamic from its first compilation on.

    Packed micro-batches each have their own length (hundreds of lengths a step). dynamo's default compiles a first
    graph for the first length's exact sizes, recompiles with a dynamic length at the second, and once more when the
    number of 128-token blocks changes (12 lengths gave 3 graphs of flex attention on the CPU, torch 2.13). A dynamo
    that kept the lengths static would pass its `recompile_limit` (8) after 8 lengths and then run flex attention
    uncompiled, which materialises the whole score matrix: 28 heads x T^2 x 4 bytes, about 90 GB at the 7B scripts'
    T = 28,672. With every size dynamic from the start, flex attention and the compiled block mask compile once per
    grad mode (`benchmarks/gpu_check.py` counts the graphs on a GPU). Scoped to the block (dynamo reads the setting
    when it compiles): vLLM's graphs, in the same process under verl's hybrid engine, are compiled outside it.
    """
    with torch._dynamo.config.patch(assume_static_by_default=False):
        yield


@contextmanager
def logits_from_predecessors(model: Any, source: Callable[[], torch.Tensor | None]) -> Iterator[None]:
    """Within the block, the LM head of `model` reads, at column t, the hidden state at column `source()[t]`.

    Args:
        model: a transformers causal LM (`get_output_embeddings()` is its LM head).
        source: called at each LM-head call; returns (bs, T) column indices, or None to leave the call alone.

    Raises:
        ValueError: when the model has no LM head module, or the hidden states do not have source's shape.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output-embedding module to take predecessor logits from.")

    def gather(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        index = source()
        if index is None:
            return None
        hidden = args[0]
        if tuple(hidden.shape[:2]) != tuple(index.shape):
            raise ValueError(
                f"LM-head input {tuple(hidden.shape)} does not match the packed rows {tuple(index.shape)}: sequence "
                "parallelism and fused LM-head kernels are not supported with algorithm.carl.packing=tree."
            )
        index = index.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return (torch.gather(hidden, 1, index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
