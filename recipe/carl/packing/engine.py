"""verl's FSDP language-model engine with tree attention for packed rows, registered through `EngineRegistry`.

`TreePackedFSDPEngine` is `FSDPEngineWithLMHead` plus one thing: a micro-batch row whose `extra_fields` carry
`carl_tree_runs` (`recipe.carl.packing.layout.PackedRow.tree_runs`) is run with its path position ids, its tree
attention mask and its logits taken at each token's predecessor (`recipe.carl.packing.attention`). Everything else
(remove-padding or padded layouts, dynamic batch sizes, the log-prob, entropy and loss code, FSDP) is verl's own
code, unchanged. A micro-batch without such rows goes straight to verl's `forward_step`.

Rows verl adds to fill a batch (`_balance_batch`: 128 EOS tokens, response_mask 0) copy another row's
`extra_fields`; their runs do not fit their length and they train nothing, so they run as ordinary causal rows.

Registration (`register_engine`; `recipe.carl.packing.register` runs it when a process imports `verl.workers.engine`):
verl registers its FSDP engines per device (`cuda`, `npu`; the CPU platform adds `cpu`); `EngineRegistry.get_engine_cls`
tries the key (device, vendor) before the device alone, so registering this class for the process's own
(device, vendor) makes verl build it for `actor` and `ref` with no patch of verl.

Not supported with packed rows, each refused by name: Ulysses sequence parallelism, fused LM-head kernels, 3-D
(mRoPE) position ids, flash-attn, sdpa and eager on a GPU (a dense T x T mask; flex attention instead),
per-sequence loss aggregations.

The first packed passes are timed and logged (rank 0, `PassTimer`): flex attention compiles its block mask and its
kernels during the first pass of each kind, which can take minutes, and the log says how much. Under flex attention
every micro-batch runs with dynamic sizes (`recipe.carl.packing.attention.dynamic_lengths`), so that its length,
different in every micro-batch, does not recompile it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from verl.utils import tensordict_utils as tu
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from recipe.carl.packing import PACKED_LOSS_AGG_MODES, RUNS_KEY, tree_attention_problem
from recipe.carl.packing.attention import (
    build_attention_mask,
    dynamic_lengths,
    layout_rows,
    logits_from_predecessors,
    to_model_layout,
)


def packed_runs(micro_batch: Any) -> list[Any] | None:
    """Each row's runs (None for ordinary rows), or None when no row of the micro-batch is packed.

    Raises:
        ValueError: when a row that trains tokens carries runs that do not fit its length.
    """
    extra = tu.get(micro_batch, "extra_fields", default=None)
    if not extra:
        return None
    runs = [e.get(RUNS_KEY) if isinstance(e, dict) else None for e in extra]
    if all(r is None for r in runs):
        return None
    ids, mask = micro_batch["input_ids"], micro_batch["response_mask"]
    lengths = ids.offsets().diff().tolist() if ids.is_nested else [ids.shape[-1]] * ids.shape[0]
    trained = [int(m.sum()) for m in mask.unbind()]
    for i, (row_runs, n) in enumerate(zip(runs, lengths, strict=True)):
        if row_runs is not None and sum(int(r[0]) for r in row_runs) != n:
            if trained[i] == 0:  # a padding row with another row's extra_fields
                runs[i] = None
                continue
            raise ValueError(
                f"packed row {i} has {n} tokens but its {RUNS_KEY} describe {sum(int(r[0]) for r in row_runs)}: "
                "something changed the row after the agent loop laid it out (truncation?)."
            )
    return runs if any(r is not None for r in runs) else None


def check_loss_aggregation(loss_function: Any) -> None:
    """Refuses verl's per-sequence loss aggregations for packed rows (they weigh a token by the row it is in).

    Raises:
        ValueError: naming the mode and the setting, when `loss_function` is verl's loss bound to such a config.
    """
    config = loss_function.keywords.get("config") if isinstance(loss_function, functools.partial) else None
    mode = getattr(config, "loss_agg_mode", None)
    if mode is not None and mode not in PACKED_LOSS_AGG_MODES:
        raise ValueError(
            f"actor_rollout_ref.actor.loss_agg_mode={mode} averages per row, and tree-packed rows group tokens "
            f"differently from per-path rows: use one of {PACKED_LOSS_AGG_MODES} or algorithm.carl.packing=path."
        )


class PassTimer:
    """Logs the first two packed passes of each kind (`log-prob`, `update`) and what the first cost beyond its share.

    With flex attention, the first pass of each kind compiles `create_block_mask` and the attention kernels (forward;
    backward in an update), once per process; the second pass runs compiled code. "Beyond its share" is the first
    pass's time minus the second pass's time per token times the first pass's tokens: the compilation, to within the
    noise of the passes. One timer per process (`PROCESS_TIMER`), as compiled code is shared by its engines.
    """

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.seen: dict[str, list[tuple[float, int]]] = {}

    def active(self, kind: str) -> bool:
        """Whether a pass of this kind is still to be logged."""
        return len(self.seen.get(kind, ())) < 2

    def record(self, kind: str, seconds: float, tokens: int, attn: str = "flex_attention") -> str | None:
        """Logs a packed pass of `kind` that took `seconds` for `tokens` tokens (only the first two per kind)."""
        if not self.active(kind):
            return None
        seen = self.seen.setdefault(kind, [])
        seen.append((seconds, tokens))
        compiles = attn == "flex_attention"
        if len(seen) == 1:
            why = "flex attention compiles its block mask and kernels in this pass; " if compiles else ""
            message = (
                f"first packed {kind} pass ({attn}): {seconds:.1f} s for {tokens} tokens ({why}the second pass "
                "shows how much more than its share it took)"
            )
        else:
            (first, first_tokens), (second, second_tokens) = seen
            beyond = max(0.0, first - second * first_tokens / max(second_tokens, 1))
            message = (
                f"second packed {kind} pass ({attn}): {second:.1f} s for {second_tokens} tokens, so the first pass "
                f"took ~{beyond:.1f} s beyond its share of tokens at this pass's rate"
                + (": flex attention's compilation" if compiles else "")
            )
        self.log(f"[carl packing] {message}")
        return message


PROCESS_TIMER = PassTimer()
"""The packed passes of this process (compiled code is per process: actor and reference engines share it)."""


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class TreePackedFSDPEngine(FSDPEngineWithLMHead):
    """`FSDPEngineWithLMHead` that runs tree-packed rows with tree attention (see the module docstring)."""

    _carl_source: torch.Tensor | None = None
    _carl_packed_seen = False
    """Set by `forward_step` when a micro-batch held packed rows (read by `forward_backward_batch`)."""
    _carl_timer: PassTimer | None = None
    """Where this engine's packed passes are timed (None: `PROCESS_TIMER`)."""

    def _hf_model(self) -> Any:
        return getattr(self.module, "_fsdp_wrapped_module", self.module)

    def _check_packing_supported(self, micro_batch: Any) -> None:
        problems = []
        if getattr(self, "use_ulysses_sp", False):
            problems.append("actor_rollout_ref.actor.ulysses_sequence_parallel_size=1 (a path would span ranks)")
        if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            problems.append("actor_rollout_ref.model.use_fused_kernels=False (they bypass the LM head)")
        if micro_batch["position_ids"].dim() == 3:
            problems.append("a model with 1-D position ids (mRoPE models are not supported)")
        attention = tree_attention_problem(
            self._hf_model().config._attn_implementation, micro_batch["input_ids"].device.type
        )
        if attention:
            problems.append(attention)
        if problems:
            fixes = "; ".join(problems)
            raise ValueError(f"algorithm.carl.packing=tree needs {fixes}; or set algorithm.carl.packing=path.")

    def prepare_model_inputs(self, micro_batch: Any):
        self._carl_source = None
        runs = packed_runs(micro_batch)
        if runs is None:
            return super().prepare_model_inputs(micro_batch)
        self._check_packing_supported(micro_batch)
        offsets = micro_batch["input_ids"].offsets()
        positions, span_ends, predecessors = layout_rows(runs, offsets.diff().tolist())
        # Step 1: path position ids, so verl's padding / remove-padding code lays them out like any others.
        values = torch.as_tensor(positions, device=offsets.device)
        micro_batch["position_ids"] = torch.nested.nested_tensor_from_jagged(values, offsets)
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        # Step 2: the tree mask and the predecessor map in the layout the model gets (verl may have padded it).
        input_ids = model_inputs["input_ids"]
        packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        span_end, source = to_model_layout(span_ends, predecessors, input_ids.shape[-1], packed)
        attn = self._hf_model().config._attn_implementation
        model_inputs["attention_mask"] = build_attention_mask(span_end.to(input_ids.device), attn)
        self._carl_source = source.to(input_ids.device)
        return model_inputs, output_args

    def forward_backward_batch(self, data: Any, loss_function, forward_only=False):
        kind = "log-prob" if forward_only else "update"
        timer = self._carl_timer or PROCESS_TIMER
        if not (timer.active(kind) and _is_rank_zero()):
            return super().forward_backward_batch(data, loss_function, forward_only)
        self._carl_packed_seen = False
        start = time.perf_counter()
        output = super().forward_backward_batch(data, loss_function, forward_only)
        if self._carl_packed_seen:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the last backward may still run
            ids = data["input_ids"]
            tokens = ids.values().numel() if ids.is_nested else ids.numel()
            timer.record(kind, time.perf_counter() - start, tokens, self._hf_model().config._attn_implementation)
        return output

    def _compile_scope(self) -> contextlib.AbstractContextManager[None]:
        """Dynamic sizes under flex attention: packed rows, and GRPO's ordinary rows in transformers' own block mask."""
        flex = self._hf_model().config._attn_implementation == "flex_attention"
        return dynamic_lengths() if flex else contextlib.nullcontext()

    def forward_step(self, micro_batch: Any, loss_function, forward_only):
        with self._compile_scope():
            if packed_runs(micro_batch) is None:
                return super().forward_step(micro_batch, loss_function, forward_only)
            self._carl_packed_seen = True
            check_loss_aggregation(loss_function)
            try:
                with logits_from_predecessors(self._hf_model(), lambda: self._carl_source):
                    return super().forward_step(micro_batch, loss_function, forward_only)
            finally:
                self._carl_source = None


def register_engine() -> type[TreePackedFSDPEngine]:
    """Registers `TreePackedFSDPEngine` for this process's (device, vendor), ahead of verl's per-device engine.

    Idempotent. Uses the device and vendor `EngineRegistry.get_engine_cls` will look up (its environment
    overrides included).
    """
    from verl.utils.device import get_device_name, get_vendor

    device = os.getenv("VERL_ENGINE_DEVICE") or get_device_name()
    vendor = os.getenv("VERL_ENGINE_VENDOR") or get_vendor()
    try:
        EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=device, vendor=vendor)(
            TreePackedFSDPEngine
        )
    except AssertionError as error:  # verl asserts on a taken key: fine when it holds this class already
        if "already" not in str(error) or EngineRegistry.get_engine_cls("language_model", "fsdp2") is not (
            TreePackedFSDPEngine
        ):
            raise
    return TreePackedFSDPEngine


# Importing this module registers the engine (see `recipe.carl.packing.register`).
register_engine()
