"""The inference engines a question is rolled out on: the ones training uses on that hardware.

- `HFEngine`: the CPU rollout backend (`HFRolloutServer`) in process, no Ray;
- `VLLMEngine`: vLLM's `AsyncLLM` in process, sampling parameters mapped as verl's `vLLMHttpServer` maps them.

Both expose verl's `generate(request_id=, prompt_ids=, sampling_params=)`, which is all the agent loop's
`SearchEnvironment` calls. transformers, verl and vLLM are imported inside the functions that build an engine, so that
`python -m recipe.carl.evaluate -h` and the input checks start without them.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

from recipe.carl.cpu.platform import is_requested
from recipe.carl.evaluate.settings import EvalError, EvalSettings

logger = logging.getLogger(__name__)

EVAL_ATTENTION = "sdpa"
"""The attention `HFEngine` loads a model with, whatever its `config.json` says. verl writes the training run's
`override_config.attn_implementation` into every checkpoint's `huggingface/config.json` (its `update_model_config`
sets the attribute, and transformers saves it), e.g. `flex_attention` for `algorithm.carl.packing=tree`; loaded as it
is, the evaluation would silently switch to that attention (compiled, and slower to decode). vLLM ignores the key."""


class HFEngine:
    """The CPU rollout backend (`HFRolloutServer`) in this process: the engine training uses on a CPU.

    On a GPU (without `CARL_DEVICE=cpu`) it runs there too, in `dtype` (bf16 by default); on a CPU always fp32.
    """

    name = "hf"

    def __init__(self, model_dir: str | Path, tokenizer: Any, settings: EvalSettings, dtype: str = "auto"):
        # deferred (as every engine import): transformers, verl and vLLM load only when an engine is built
        from transformers import AutoModelForCausalLM
        from verl.workers.config import RolloutConfig

        from recipe.carl.cpu.rollout import (  # here, not at the top: it imports ray
            HFRolloutServer,
            _dtype,
            select_device,
        )

        device = select_device()
        # fp32 on a CPU (as the CPU rollout); elsewhere bf16 unless asked otherwise
        torch_dtype = _dtype("bfloat16" if dtype == "auto" else dtype, device)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype, attn_implementation=EVAL_ATTENTION
        )
        model = model.to(device).eval()
        rollout = RolloutConfig(
            name="carl_hf",
            prompt_length=settings.prompt_length,
            response_length=settings.response_length,
            tensor_model_parallel_size=1,
            seed=settings.seed,
        )
        self.server = HFRolloutServer(rollout, model_config=None, model=model, tokenizer=tokenizer)

    async def generate(self, *, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]) -> Any:
        return await self.server.generate(prompt_ids=prompt_ids, sampling_params=sampling_params, request_id=request_id)

    async def close(self) -> None:
        self.server = None


class VLLMEngine:
    """vLLM's `AsyncLLM` in this process, behind the `generate(request_id=, prompt_ids=, sampling_params=)` of verl.

    Hand-written rather than verl's `vLLMHttpServer`, which is a Ray actor that also runs an HTTP server and the
    trainer's weight sync; `generate` below maps the sampling parameters as its `generate` does (verl 0.9.1): a
    `max_tokens` clamped to [1, room left in max_model_len], `logprobs` True -> 0 (the sampled token's log-prob),
    `repetition_penalty` 1.0 and `ignore_eos` False unless given, and per-token log-probs read back for the sampled
    ids. The engine is built with the same worker extension as verl's and gets the same logits mask (no token id at
    or beyond `len(tokenizer)`: Qwen's embedding has unused rows). `generation_config="vllm"`: sampling defaults
    come from the request, never from the model's `generation_config.json` (verl overrides them the same way).
    """

    name = "vllm"

    def __init__(self, engine: Any, settings: EvalSettings, max_model_len: int):
        self.engine, self.settings, self.max_model_len = engine, settings, max_model_len

    @classmethod
    async def start(
        cls,
        model_dir: str | Path,
        tokenizer: Any,
        settings: EvalSettings,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> VLLMEngine:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        max_model_len = settings.prompt_length + settings.response_length
        args = {
            "model": str(model_dir),
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": settings.seed,
            "enable_prefix_caching": True,  # every turn of a trajectory re-sends its prefix
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "max_num_seqs": min(settings.concurrency, 1024),
            "logprobs_mode": "processed_logprobs",  # verl's rollout default
            "generation_config": "vllm",
            "worker_extension_cls": "verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension",
            **(engine_kwargs or {}),
        }
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        try:
            await engine.collective_rpc(
                method="monkey_patch_model", kwargs={"vocab_size": len(tokenizer), "banned_token_ids": []}
            )
        except BaseException:
            engine.shutdown()
            raise
        return cls(engine, settings, max_model_len)

    def request(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> tuple[Any, Any]:
        """The vLLM prompt and `SamplingParams` of one request (verl's `vLLMHttpServer.generate` mapping)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = dict(sampling_params)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_model_len={self.max_model_len}")
        max_tokens = params.pop("max_tokens", None)
        max_tokens = params.pop("max_new_tokens", None) if max_tokens is None else max_tokens
        if max_tokens is None:
            s = self.settings
            max_tokens = min(s.response_length, s.prompt_length + s.response_length - len(prompt_ids))
        params["logprobs"] = 0 if params.pop("logprobs", False) else None
        params.setdefault("repetition_penalty", 1.0)
        params.setdefault("ignore_eos", False)
        sampling = SamplingParams(max_tokens=max(1, min(int(max_tokens), room)), **params)
        return TokensPrompt(prompt_token_ids=list(prompt_ids)), sampling

    async def generate(self, *, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        prompt, sampling = self.request(prompt_ids, sampling_params)
        final = None
        # One vLLM request per turn: ids must be unique among running requests (verl's client adds a suffix too).
        async for output in self.engine.generate(prompt, sampling, f"{request_id}-{uuid.uuid4().hex[:12]}"):
            final = output
        if final is None or not final.outputs:
            return TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted")
        out = final.outputs[0]
        token_ids = list(out.token_ids)
        log_probs = None
        if sampling.logprobs is not None:
            log_probs = [entry[token_ids[i]].logprob for i, entry in enumerate(out.logprobs)]
        stop = "aborted" if out.finish_reason == "abort" else "completed"
        return TokenOutput(token_ids=token_ids, log_probs=log_probs, stop_reason=stop, extra_fields={})

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(requested: str) -> str:
    """`auto`: vLLM where a GPU and vLLM are there (as training uses them), else the CPU backend.

    Raises:
        EvalError: `vllm` asked for where it is not installed.
    """
    if requested == "vllm":
        if not vllm_installed():
            raise EvalError(
                f"--engine vllm: vLLM is not installed in {sys.executable}. On a GPU node: pip install -e '.[gpu]' "
                "(verl's vllm extra); on a CPU: bash scripts/install_cpu.sh --vllm and run with .venv-vllm/bin/python; "
                "or use --engine hf (the CPU backend)."
            )
        return "vllm"
    if requested == "hf":
        return "hf"
    if requested != "auto":
        raise EvalError(f"--engine {requested}: use auto, vllm or hf.")
    import torch  # here, not at the top: it is torch, needed only when choosing

    gpu = torch.cuda.is_available() and not is_requested()
    if gpu and not vllm_installed():
        logger.warning("a GPU is there but vLLM is not installed: evaluating with the hf engine (slower)")
    return "vllm" if gpu and vllm_installed() else "hf"
