"""Batched token-in/token-out sampling for a Hugging Face causal LM (no verl, no Ray).

Two layers:

* :class:`CausalLMEngine` runs one left-padded batch to completion with its own decode loop over a KV cache.
  Each row carries its own sampling parameters (temperature, top-k, top-p, stop tokens, length budget), so any
  set of requests can share one forward pass; rows that finish are dropped from the cache (``reorder_cache``)
  so the batch shrinks instead of decoding padding. The prefill runs in row chunks of at most
  ``max_num_batched_tokens`` tokens (vLLM's name for the same bound), which fill one KV cache for the decode loop.
* :class:`BatchingScheduler` is the asyncio front: concurrent ``submit()`` calls that arrive while the engine
  is idle (within ``batch_wait_ms``) or busy are grouped into the next batch, which runs in a worker thread so
  the event loop keeps accepting requests. Futures resolve as soon as their row finishes.

Log-prob convention (``logprobs_mode``), matching vLLM, which verl 0.9.1 configures with
``rollout.logprobs_mode=processed_logprobs``: the log-prob of the sampled token under the distribution it was
actually sampled from, i.e. ``log_softmax(top_k_top_p(logits / temperature))``. With top-k and top-p disabled
this is exactly what verl's actor recomputes as ``old_log_probs`` (``logits / temperature``), so
``training/rollout_probs_diff_*`` measures only numerical and weight-staleness differences. ``raw_logprobs``
returns ``log_softmax(logits)`` instead. Greedy rows (temperature 0) use temperature 1 for their log-probs, as
vLLM does.

Out-of-vocabulary rows of the LM head (``vocab_size``): verl's vLLM server sets the logits of every id at or above
``len(tokenizer)`` to ``-inf`` before sampling (``monkey_patch_compute_logits`` in
``verl/workers/rollout/vllm_rollout/utils.py``, called with ``vocab_size=len(tokenizer)``), so padded embedding rows
can never be sampled and every log-prob is normalised over the tokenizer's ids only. The engine does the same, so
``carl_hf`` and verl's vLLM rollout sample from the same distribution.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Temperatures below this are greedy (vLLM uses the same epsilon).
GREEDY_EPS = 1e-5

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")

# Keys of vLLM/SGLang sampling params that only affect detokenised text, which a token-in/token-out server never
# returns: accepted and ignored, so agent loops written for vLLM run unchanged.
_TEXT_ONLY_KEYS = frozenset(
    {"skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "detokenize"}
)


@dataclass(frozen=True)
class SamplingSpec:
    """Normalised sampling parameters of one request.

    Attributes:
        max_tokens: Most tokens to generate (>= 1).
        temperature: Softmax temperature; below ``GREEDY_EPS`` means greedy decoding.
        top_p: Nucleus mass in (0, 1]; 1 disables it.
        top_k: Keep the k most likely tokens; 0 or negative disables it (vLLM uses -1).
        min_tokens: EOS and stop tokens are masked out until this many tokens exist.
        stop_token_ids: Extra token ids that end the request (kept in the output, as vLLM does).
        stop: Stop strings, matched on the decoded response; the token that completes one is kept.
        ignore_eos: Do not stop at the model's EOS tokens.
        logprobs: Return the sampled tokens' log-probs.
        seed: Per-request RNG seed (sampled rows with a seed use their own generator).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = True
    seed: int | None = None


@dataclass
class GenerationResult:
    """Output of one request.

    Attributes:
        token_ids: Generated token ids.
        log_probs: Log-prob of each generated token (see the module docstring for the convention).
        finish_reason: ``"stop"`` (EOS, stop token or stop string), ``"length"`` (``max_tokens``) or ``"abort"``.
    """

    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish_reason: str = "length"


def parse_sampling_params(
    params: dict[str, Any],
    *,
    default_max_tokens: int,
    max_possible_tokens: int,
) -> SamplingSpec:
    """Turn a vLLM-style sampling-params dict into a :class:`SamplingSpec`.

    Args:
        params: Keys as verl's agent loops send them to vLLM (``temperature``, ``top_p``, ``top_k``,
            ``max_tokens`` or ``max_new_tokens``, ``logprobs``, ``stop_token_ids``, ``stop``, ``ignore_eos``,
            ``min_tokens``, ``seed``, ``repetition_penalty`` (only 1.0), ``n`` (only 1)). The dict is not modified.
        default_max_tokens: Budget when the request names none.
        max_possible_tokens: Room left in the context window; the budget is clamped to ``[1, this]``.

    Returns:
        The normalised spec.

    Raises:
        ValueError: On an unknown key or an unsupported value, naming it.
    """
    p = dict(params)
    if max_possible_tokens < 1:
        raise ValueError(
            f"prompt leaves no room to generate (max_possible_tokens={max_possible_tokens}); "
            "raise rollout.max_model_len or shorten the prompt"
        )
    max_tokens = p.pop("max_tokens", None)
    alt = p.pop("max_new_tokens", None)
    max_tokens = alt if max_tokens is None else max_tokens
    max_tokens = default_max_tokens if max_tokens is None else int(max_tokens)
    max_tokens = max(1, min(max_tokens, max_possible_tokens))

    repetition_penalty = float(p.pop("repetition_penalty", 1.0) or 1.0)
    if repetition_penalty != 1.0:
        raise ValueError(f"repetition_penalty={repetition_penalty} is not supported by the carl_hf rollout; use 1.0")
    n = int(p.pop("n", 1) or 1)
    if n != 1:
        raise ValueError(f"n={n} is not supported by the carl_hf rollout: send n separate requests (verl does)")
    prompt_logprobs = p.pop("prompt_logprobs", None)
    if prompt_logprobs:
        raise ValueError("prompt_logprobs is not supported by the carl_hf rollout; drop it from sampling_params")
    stop = p.pop("stop", None) or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    top_k = p.pop("top_k", -1)
    spec = SamplingSpec(
        max_tokens=max_tokens,
        temperature=float(p.pop("temperature", 1.0)),
        top_p=float(p.pop("top_p", 1.0)),
        top_k=-1 if top_k is None else int(top_k),
        min_tokens=int(p.pop("min_tokens", 0) or 0),
        stop_token_ids=frozenset(int(t) for t in (p.pop("stop_token_ids", None) or ())),
        stop=stop,
        ignore_eos=bool(p.pop("ignore_eos", False)),
        # vLLM semantics: any truthy value (True, 0 is falsy there too) asks for the sampled token's log-prob.
        logprobs=bool(p.pop("logprobs", False)),
        seed=p.pop("seed", None),
    )
    unknown = set(p) - _TEXT_ONLY_KEYS
    if unknown:
        raise ValueError(
            f"unsupported sampling params {sorted(unknown)} for the carl_hf rollout; supported: temperature, top_p, "
            "top_k, max_tokens/max_new_tokens, min_tokens, logprobs, stop_token_ids, stop, ignore_eos, seed"
        )
    if spec.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {spec.temperature}")
    if not 0.0 < spec.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {spec.top_p}")
    return spec


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Apply temperature, then top-k, then top-p per row, as vLLM's sampler does.

    Args:
        logits: Float logits, shape ``(b, vocab)``.
        temperature: Shape ``(b,)``; greedy rows must already carry 1.0.
        top_k: Shape ``(b,)`` long; values <= 0 or >= vocab disable top-k for that row.
        top_p: Shape ``(b,)``; 1.0 disables top-p for that row.

    Returns:
        Processed logits, shape ``(b, vocab)``, with filtered entries at ``-inf``.
    """
    vocab = logits.shape[-1]
    out = logits / temperature.unsqueeze(-1)
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
    if bool((k < vocab).any()):
        # Threshold at the k-th largest value of each row; ties at the threshold are kept, like vLLM.
        sorted_vals = out.sort(dim=-1, descending=True).values
        kth = sorted_vals.gather(-1, (k - 1).unsqueeze(-1))
        out = out.masked_fill(out < kth, float("-inf"))
    if bool((top_p < 1.0).any()):
        sorted_vals, sorted_idx = out.sort(dim=-1, descending=False)
        cum = sorted_vals.softmax(dim=-1).cumsum(dim=-1)
        # Drop the low-probability tail whose total mass is <= 1 - top_p; the most likely token always survives.
        drop_sorted = cum <= (1.0 - top_p).unsqueeze(-1)
        drop_sorted[:, -1] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


class CausalLMEngine:
    """Runs batches of token-in/token-out requests through a Hugging Face causal LM.

    Args:
        model: A ``transformers`` causal LM in eval mode (any device, any dtype; logits are upcast to fp32).
        eos_token_ids: Token ids that end a request unless it sets ``ignore_eos``.
        pad_token_id: Id written into left padding (masked out, so any valid id works).
        logprobs_mode: ``processed_logprobs`` (vLLM's and verl's default) or ``raw_logprobs``.
        tokenizer: Only needed for requests with stop strings.
        seed: Seed of the shared sampling generator (rows without their own seed).
        vocab_size: Number of real token ids (verl passes ``len(tokenizer)`` to its vLLM server); logits of ids at or
            above it are set to ``-inf`` before sampling and log-probs, as verl's vLLM rollout does. None: no mask.
        max_num_batched_tokens: Most (padded) tokens per prefill forward pass; larger batches are prefilled in row
            chunks. The activations of one pass over all rows are the engine's memory peak: for 128 rows of 400
            tokens with the 4-layer tiny policy, peak RSS was 1.35 GB in one pass and 0.71 GB in 8192-token chunks
            (the KV cache itself is 0.2 GB).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_ids: Iterable[int],
        pad_token_id: int = 0,
        logprobs_mode: str = "processed_logprobs",
        tokenizer: Any = None,
        seed: int = 0,
        max_num_batched_tokens: int = 8192,
        vocab_size: int | None = None,
    ):
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 (the tokenizer's length) or None, got {vocab_size}")
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode={logprobs_mode!r} is not supported; use one of {LOGPROBS_MODES}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.model = model
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.logprobs_mode = logprobs_mode
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def _check_requests(self, prompts: Sequence[Sequence[int]], specs: Sequence[SamplingSpec]) -> None:
        """Raises ValueError, saying what is wrong, for requests that `generate` cannot serve."""
        if len(prompts) != len(specs):
            raise ValueError(f"got {len(prompts)} prompts but {len(specs)} sampling specs")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        for s in specs:
            if s.stop and self.tokenizer is None:
                raise ValueError(f"stop strings {s.stop} need a tokenizer; the engine was built without one")

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        specs: Sequence[SamplingSpec],
        should_abort: Callable[[], bool] | None = None,
        on_finish: Callable[[int, GenerationResult], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for all prompts in one left-padded batch.

        Args:
            prompts: Token ids per request (each non-empty).
            specs: Sampling spec per request.
            should_abort: Polled once per decode step; when it returns True all unfinished rows end as "abort".
            on_finish: Called with ``(request_index, result)`` as soon as a row finishes.

        Returns:
            One result per prompt, in order.
        """
        self._check_requests(prompts, specs)
        n, dev = len(prompts), self.device
        results = [GenerationResult() for _ in range(n)]
        width = max(len(p) for p in prompts)

        # 1. Left-pad the prompts so every row's next token sits in the last column.
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long, device=dev)
        attention_mask = torch.zeros((n, width), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long, device=dev)
            attention_mask[i, width - len(p) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        # 2. Per-row sampling parameters as tensors, so rows with different settings share each forward pass.
        greedy = torch.tensor([s.temperature < GREEDY_EPS for s in specs], device=dev)
        temperature = torch.tensor([1.0 if s.temperature < GREEDY_EPS else s.temperature for s in specs], device=dev)
        top_k = torch.tensor([s.top_k for s in specs], dtype=torch.long, device=dev)
        top_p = torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=dev)
        row_gens = {
            i: torch.Generator(device=dev).manual_seed(int(s.seed))
            for i, s in enumerate(specs)
            if s.seed is not None and s.temperature >= GREEDY_EPS
        }
        active = list(range(n))  # batch row -> request index

        # 3. Prefill in row chunks of at most max_num_batched_tokens; only the last position's logits are needed.
        cache, logits = self._prefill(input_ids, attention_mask, position_ids)
        self._mask_oov(logits)
        next_pos = position_ids[:, -1] + 1

        # 4. Decode loop: sample, record, retire finished rows, feed the sampled tokens back.
        while True:
            self._mask_early_stops(logits, [specs[r] for r in active], [len(results[r].token_ids) for r in active])
            processed = process_logits(logits, temperature, top_k, top_p)
            logp = torch.log_softmax(processed, dim=-1)
            tokens = logits.argmax(dim=-1)
            if not bool(greedy.all()):
                sampled = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(-1)
                tokens = torch.where(greedy, tokens, sampled)
            for b, r in enumerate(active):
                if r in row_gens:
                    tokens[b] = torch.multinomial(logp[b].exp(), 1, generator=row_gens[r]).squeeze(-1)
            ref = logp if self.logprobs_mode == "processed_logprobs" else torch.log_softmax(logits, dim=-1)
            token_logp = ref.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

            abort = should_abort is not None and should_abort()
            keep: list[int] = []
            for b, (r, tok, lp) in enumerate(zip(active, tokens.tolist(), token_logp.tolist(), strict=True)):
                res, spec = results[r], specs[r]
                res.token_ids.append(tok)
                res.log_probs.append(lp)
                reason = self._finish_reason(res.token_ids, spec)
                if reason is None and abort:
                    reason = "abort"
                if reason is None:
                    keep.append(b)
                    continue
                res.finish_reason = reason
                if on_finish is not None:
                    on_finish(r, res)
            if not keep:
                return results

            # 5. Drop finished rows from every per-row tensor and from the KV cache.
            if len(keep) < len(active):
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.reorder_cache(idx)
                attention_mask, next_pos, tokens = attention_mask[idx], next_pos[idx], tokens[idx]
                greedy, temperature, top_k, top_p = greedy[idx], temperature[idx], top_k[idx], top_p[idx]
                active = [active[b] for b in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
            out = self.model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=attention_mask,
                position_ids=next_pos.unsqueeze(-1),
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :].float()
            self._mask_oov(logits)
            next_pos = next_pos + 1

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """Prefill `(n, width)` left-padded rows, `max(1, max_num_batched_tokens // width)` rows per forward pass.

        Returns:
            The KV cache of all `n` rows and the `(n, vocab)` fp32 logits of each row's last position.
        """
        from transformers import DynamicCache

        config = getattr(self.model, "config", None)
        n, width = input_ids.shape
        rows = max(1, self.max_num_batched_tokens // width)
        cache, logits = None, []
        for lo in range(0, n, rows):
            part = DynamicCache(config=config)
            out = self.model(
                input_ids=input_ids[lo : lo + rows],
                attention_mask=attention_mask[lo : lo + rows],
                position_ids=position_ids[lo : lo + rows],
                past_key_values=part,
                use_cache=True,
                logits_to_keep=1,
            )
            logits.append(out.logits[:, -1, :].float())
            del out
            if rows >= n:
                return part, logits[0]
            if cache is None:
                # The first chunk's cache becomes the batch's: each layer's (rows, heads, width, head_dim) keys and
                # values are widened to all n rows, which later chunks fill in place (no second copy of the cache).
                cache = part
                for layer in cache.layers:
                    for name in ("keys", "values"):
                        first = getattr(layer, name)
                        full = first.new_empty((n, *first.shape[1:]))
                        full[: len(first)] = first
                        setattr(layer, name, full)
                continue
            for layer, chunk in zip(cache.layers, part.layers, strict=True):
                layer.keys[lo : lo + len(chunk.keys)] = chunk.keys
                layer.values[lo : lo + len(chunk.values)] = chunk.values
        return cache, torch.cat(logits)

    def _mask_oov(self, logits: torch.Tensor) -> None:
        """Set the logits of ids >= ``vocab_size`` to ``-inf`` (in place), as verl's vLLM server does."""
        if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
            logits[:, self.vocab_size :] = float("-inf")

    def _mask_early_stops(self, logits: torch.Tensor, specs: list[SamplingSpec], lengths: list[int]) -> None:
        """Forbid EOS/stop tokens for rows still below ``min_tokens`` (in place)."""
        for b, (spec, length) in enumerate(zip(specs, lengths, strict=True)):
            if length < spec.min_tokens:
                banned = set(spec.stop_token_ids) | (set() if spec.ignore_eos else set(self.eos_token_ids))
                if banned:
                    logits[b, sorted(banned)] = float("-inf")

    def _finish_reason(self, token_ids: list[int], spec: SamplingSpec) -> str | None:
        """Return why a row ends after its newest token, or None if it continues."""
        tok = token_ids[-1]
        if len(token_ids) >= spec.min_tokens:
            if tok in spec.stop_token_ids or (not spec.ignore_eos and tok in self.eos_token_ids):
                return "stop"
            if spec.stop:
                text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
                if any(s in text for s in spec.stop):
                    return "stop"
        if len(token_ids) >= spec.max_tokens:
            return "length"
        return None


@dataclass
class _Pending:
    prompt: list[int]
    spec: SamplingSpec
    future: asyncio.Future


class BatchingScheduler:
    """Groups concurrent requests into batches for a :class:`CausalLMEngine`.

    Requests that arrive while the engine is idle wait up to ``batch_wait_ms`` for company; requests that arrive
    while a batch runs join the next one. One batch runs at a time, in a worker thread.

    Args:
        engine: The engine to drive.
        max_batch_size: Most requests per forward pass.
        batch_wait_ms: How long an idle engine waits for more requests before starting a batch.
    """

    def __init__(self, engine: CausalLMEngine, max_batch_size: int = 256, batch_wait_ms: float = 5.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._pending: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abort = threading.Event()
        self.num_batches = 0
        self.batch_sizes: list[int] = []

    def _ensure_started(self) -> None:
        # Created lazily and per event loop: asyncio primitives belong to the loop that serves the requests (a Ray
        # actor has one loop; tests that call asyncio.run() repeatedly get a fresh loop each time).
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._lock = asyncio.Lock()
            self._task = loop.create_task(self._run())

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a batch runs; hold it to change the model (e.g. load weights) between batches."""
        self._ensure_started()
        return self._lock

    async def submit(self, prompt_ids: Sequence[int], spec: SamplingSpec) -> GenerationResult:
        """Queue one request and wait for its result."""
        self._ensure_started()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(list(prompt_ids), spec, fut))
        self._wakeup.set()
        return await fut

    def abort_all(self) -> None:
        """End running rows now (finish_reason "abort", partial tokens kept) and fail queued ones the same way."""
        self._abort.set()
        pending, self._pending = self._pending, []
        for p in pending:
            if not p.future.done():
                p.future.set_result(GenerationResult(finish_reason="abort"))

    def resume(self) -> None:
        """Accept work again after :meth:`abort_all`."""
        self._abort.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            # Give concurrent callers a moment to arrive so they share this forward pass.
            if self.batch_wait_s > 0 and len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_s)
            async with self._lock:
                batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size :]
                if self._pending:
                    self._wakeup.set()
                if not batch:
                    continue
                self.num_batches += 1
                self.batch_sizes.append(len(batch))

                def deliver(i: int, res: GenerationResult, batch=batch) -> None:
                    fut = batch[i].future
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(res))

                try:
                    await asyncio.to_thread(
                        self.engine.generate,
                        [p.prompt for p in batch],
                        [p.spec for p in batch],
                        self._abort.is_set,
                        deliver,
                    )
                except Exception as e:  # a bad batch must fail its callers, not kill the scheduler
                    logger.exception("carl_hf batch of %d requests failed", len(batch))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(e)
