"""``carl_hf``: a transformers-based rollout backend for verl 0.9.1 (CPU, or GPU where vLLM is absent).

verl 0.9.1 generates only through async rollout servers (vLLM, SGLang, TRT-LLM). This module plugs a small one
into the same two registries those use, so ``actor_rollout_ref.rollout.name=carl_hf`` works with the stock
trainer and agent loops:

* :class:`HFRolloutServer`, a Ray actor holding a ``transformers`` causal LM, answers
  ``generate(prompt_ids, sampling_params, request_id, ...) -> TokenOutput`` like ``vLLMHttpServer.generate``.
  Concurrent requests are batched into shared forward passes by :class:`~recipe.carl.cpu.engine.BatchingScheduler`.
* :class:`HFRolloutReplica` (``RolloutReplicaRegistry``) starts one server per replica next to its trainer ranks.
* :class:`HFServerAdapter` (``BaseRollout``, built inside each FSDP worker) pushes the trainer's weights to the
  server after every step: all ranks drain verl's weight generator (the FSDP full-tensor gather is collective),
  rank 0 of each replica ships the tensors in buckets.

Log-probs follow ``rollout.logprobs_mode`` (see ``engine.py``); the default ``processed_logprobs`` equals what
the actor recomputes, so ``training/rollout_probs_diff_max`` stays near 1e-6 on CPU while weights are in sync.

Negative control: ``CARL_ROLLOUT_SKIP_WEIGHT_SYNC=1`` makes the adapter drain the weights without shipping them,
so the server keeps the initial checkpoint and the rollout/actor log-prob gap grows after the first update.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import ray
import torch

from recipe.carl.cpu import platform as cpu_platform
from recipe.carl.cpu.engine import BatchingScheduler, CausalLMEngine, parse_sampling_params

logger = logging.getLogger(__name__)

#: Default name of this backend in ``actor_rollout_ref.rollout.name``.
ROLLOUT_NAME = "carl_hf"
#: Set to 1 in the trainer workers to skip weight sync (negative control for tests).
SKIP_SYNC_ENV = "CARL_ROLLOUT_SKIP_WEIGHT_SYNC"
#: Requests per forward pass (``max_num_seqs`` caps it further).
MAX_BATCH_ENV = "CARL_ROLLOUT_MAX_BATCH"
#: Milliseconds an idle server waits to batch concurrent requests.
BATCH_WAIT_ENV = "CARL_ROLLOUT_BATCH_WAIT_MS"
#: torch intra-op threads of the server process (unset: leave torch's default).
NUM_THREADS_ENV = "CARL_ROLLOUT_NUM_THREADS"
#: Bytes per weight-sync bucket sent from trainer rank 0 to the server.
BUCKET_BYTES = 256 << 20


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def select_device() -> torch.device:
    """Return the server device: CPU under ``CARL_DEVICE=cpu`` or without CUDA, else the current CUDA device."""
    if cpu_platform.is_requested() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    # On CPU always fp32: bf16 matmuls are slow there and would not match the fp32 FSDP actor's log-probs.
    if device.type == "cpu" or not name:
        return torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    table.update({"float32": torch.float32, "fp32": torch.float32})
    if name not in table:
        raise ValueError(f"rollout.dtype={name!r} is not supported by carl_hf; use one of {sorted(table)}")
    return table[name]


class HFRolloutServer:
    """Token-in/token-out generation server over a ``transformers`` causal LM (wrap with ``ray.remote``).

    Args:
        config: verl ``RolloutConfig`` (dataclass or DictConfig).
        model_config: verl ``HFModelConfig`` (dataclass or DictConfig).
        replica_rank: Index of the replica this server belongs to (logging only).
        model: An already-built model to serve instead of loading ``model_config.local_path`` (tests).
        tokenizer: Tokenizer for stop strings; loaded from the model path when omitted and needed.
    """

    def __init__(self, config: Any, model_config: Any, replica_rank: int = 0, model=None, tokenizer=None):
        from verl.utils.config import omega_conf_to_dataclass

        # Ray hands dataclass configs over as DictConfig; verl's own servers convert them the same way.
        self.config = omega_conf_to_dataclass(config) if not hasattr(config, "__dataclass_fields__") else config
        if model is None:
            model_config = (
                omega_conf_to_dataclass(model_config)
                if not hasattr(model_config, "__dataclass_fields__")
                else model_config
            )
        self.model_config = model_config
        self.replica_rank = replica_rank
        self.device = select_device() if model is None else next(model.parameters()).device
        self.global_steps: int | None = None
        self.num_weight_updates = 0
        self._pending_update: dict[str, Any] | None = None

        if os.environ.get(NUM_THREADS_ENV):
            # On small shared CPUs fewer threads avoid oversubscription with the trainer processes.
            torch.set_num_threads(int(os.environ[NUM_THREADS_ENV]))
        if model is None:
            model, tokenizer = self._load(model_config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_model_len = self._max_model_len()
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        pad = getattr(model.config, "pad_token_id", None)
        engine = CausalLMEngine(
            self.model,
            eos_token_ids=eos_ids,
            pad_token_id=pad if pad is not None else (eos_ids[0] if eos_ids else 0),
            logprobs_mode=getattr(self.config, "logprobs_mode", None) or "processed_logprobs",
            tokenizer=tokenizer,
            seed=int(getattr(self.config, "seed", 0) or 0) + replica_rank,
            max_num_batched_tokens=int(getattr(self.config, "max_num_batched_tokens", 0) or 8192),
            # The OOV mask of verl's vLLM server (`vocab_size=len(tokenizer)`), so both rollouts sample alike.
            vocab_size=len(tokenizer) if tokenizer is not None else None,
        )
        max_batch = int(os.environ.get(MAX_BATCH_ENV, "0") or 0) or int(getattr(self.config, "max_num_seqs", 256))
        self.scheduler = BatchingScheduler(
            engine,
            max_batch_size=max(1, max_batch),
            batch_wait_ms=float(os.environ.get(BATCH_WAIT_ENV, "5")),
        )
        self._admission = asyncio.Event()
        self._admission.set()
        self._reject = False
        logger.info("carl_hf server %d ready on %s (eos=%s)", replica_rank, self.device, eos_ids)

    # ------------------------------------------------------------------ setup
    def _load(self, model_config):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = model_config.local_path or model_config.path
        attn = (model_config.override_config or {}).get("attn_implementation", "sdpa")
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_dtype(getattr(self.config, "dtype", None), self.device),
            attn_implementation=attn,
            trust_remote_code=model_config.trust_remote_code,
        ).to(self.device)
        tok_path = model_config.local_tokenizer_path or model_config.tokenizer_path or path
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=model_config.trust_remote_code)
        return model, tokenizer

    def _max_model_len(self) -> int:
        cfg = self.config
        if getattr(cfg, "max_model_len", None):
            return int(cfg.max_model_len)
        prompt_len, resp_len = getattr(cfg, "prompt_length", None), getattr(cfg, "response_length", None)
        if prompt_len and resp_len:
            return int(prompt_len) + int(resp_len)
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    async def ready(self) -> str:
        """Return the device the model lives on (used to wait for and check the actor's start)."""
        return str(self.device)

    # ------------------------------------------------------------- generation
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        priority: int = 0,
    ):
        """Generate a continuation of ``prompt_ids`` (the keyword set of ``vLLMHttpServer.generate``).

        Args:
            prompt_ids: Prompt token ids.
            sampling_params: vLLM-style sampling params (see ``engine.parse_sampling_params``); ``max_tokens``
                defaults to ``min(response_length, prompt_length + response_length - len(prompt_ids))`` as in vLLM.
            request_id: Request id (unused: there is no prefix cache).
            image_data: Must be None (text only).
            video_data: Must be None (text only).
            audio_data: Must be None (text only).
            mm_processor_kwargs: Ignored (text only).
            priority: Ignored (first come, first served).

        Returns:
            ``TokenOutput`` with ``token_ids``, ``log_probs`` (when ``sampling_params["logprobs"]`` is truthy),
            ``stop_reason`` (``"completed"`` or ``"aborted"``) and ``extra_fields["global_steps"]``.
        """
        from verl.utils import normalize_token_ids
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("carl_hf serves text-only models; image/video/audio data was passed to generate()")
        prompt_ids = normalize_token_ids(prompt_ids)
        cfg = self.config
        default_max = int(cfg.response_length)
        if getattr(cfg, "prompt_length", None):
            default_max = min(default_max, int(cfg.prompt_length) + int(cfg.response_length) - len(prompt_ids))
        spec = parse_sampling_params(
            sampling_params,
            default_max_tokens=default_max,
            max_possible_tokens=self.max_model_len - len(prompt_ids),
        )
        extra_fields = {"global_steps": self.global_steps, "num_cached_tokens": 0}
        if not self._admission.is_set():
            if self._reject:
                return TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted", extra_fields=extra_fields)
            await self._admission.wait()
        result = await self.scheduler.submit(prompt_ids, spec)
        return TokenOutput(
            token_ids=result.token_ids,
            log_probs=result.log_probs if spec.logprobs else None,
            stop_reason="aborted" if result.finish_reason == "abort" else "completed",
            extra_fields={**extra_fields, "global_steps": self.global_steps},
        )

    # ----------------------------------------------------------- weight sync
    async def begin_weight_update(self) -> None:
        """Start a bucketed weight update (see :meth:`load_weights`, :meth:`finish_weight_update`)."""
        self._pending_update = {"loaded": set(), "unknown": [], "t0": time.time()}

    async def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy a bucket of HF-named tensors into the model, between batches (never during one)."""
        if self._pending_update is None:
            await self.begin_weight_update()
        state = self.model.state_dict(keep_vars=True)
        async with self.scheduler.lock:
            with torch.no_grad():
                for name, tensor in named_tensors:
                    target = state.get(name)
                    if target is None:
                        self._pending_update["unknown"].append(name)
                        continue
                    if tuple(target.shape) != tuple(tensor.shape):
                        raise ValueError(
                            f"carl_hf weight {name!r}: trainer sent shape {tuple(tensor.shape)}, server model has "
                            f"{tuple(target.shape)}; the rollout and actor must load the same model"
                        )
                    target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
                    self._pending_update["loaded"].add(name)

    async def finish_weight_update(self, global_steps: int | None = None) -> dict[str, Any]:
        """Close a weight update, log a checksum and return a summary.

        Raises:
            ValueError: If the trainer sent tensor names the served model does not have.
        """
        info, self._pending_update = self._pending_update or {"loaded": set(), "unknown": [], "t0": time.time()}, None
        if info["unknown"]:
            raise ValueError(
                f"carl_hf: trainer sent {len(info['unknown'])} weights the served model lacks, e.g. "
                f"{info['unknown'][:5]}; check that actor_rollout_ref.model.path is the model the server loaded"
            )
        self.num_weight_updates += 1
        if global_steps is not None:
            self.global_steps = global_steps
        checksum = self.weights_checksum()
        missing = len(set(self.model.state_dict()) - info["loaded"])
        summary = {
            "update": self.num_weight_updates,
            "tensors": len(info["loaded"]),
            "missing": missing,
            "checksum": checksum,
            "global_steps": self.global_steps,
            "seconds": time.time() - info["t0"],
        }
        # One greppable line per sync; the e2e test asserts the checksum changes between updates.
        print(
            f"carl_hf update_weights #{self.num_weight_updates}: {summary['tensors']} tensors, missing={missing}, "
            f"checksum={checksum:.9e}, global_steps={self.global_steps}",
            flush=True,
        )
        return summary

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], global_steps: int | None = None):
        """One-shot update: :meth:`begin_weight_update` + :meth:`load_weights` + :meth:`finish_weight_update`."""
        await self.begin_weight_update()
        await self.load_weights(named_tensors)
        return await self.finish_weight_update(global_steps)

    def weights_checksum(self) -> float:
        """Return the fp64 sum of all parameters (a cheap fingerprint of the served weights)."""
        with torch.no_grad():
            return float(sum(p.detach().double().sum().item() for p in self.model.parameters()))

    async def get_weights_checksum(self) -> float:
        """Remote-callable :meth:`weights_checksum`."""
        return self.weights_checksum()

    async def set_global_steps(self, global_steps: int) -> None:
        """Record the trainer step of the served weights (returned in ``extra_fields``)."""
        self.global_steps = global_steps

    async def get_stats(self) -> dict[str, Any]:
        """Return batching statistics (number of forward batches and their sizes)."""
        return {"num_batches": self.scheduler.num_batches, "batch_sizes": list(self.scheduler.batch_sizes)}

    # ------------------------------------------------ lifecycle (verl calls these)
    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Stop admitting, end running rows as "aborted" (partial tokens kept) and fail queued ones."""
        self._admission.clear()
        self._reject = reject_request
        self.scheduler.abort_all()
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self) -> None:
        """Admit requests again after :meth:`abort_all_requests`."""
        self.scheduler.resume()
        self._reject = False
        self._admission.set()

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """No-op: the model stays resident (no sleep mode)."""

    async def sleep(self) -> None:
        """Hand the last generation's freed host memory back to the OS; the model stays resident.

        verl puts the replicas to sleep after each rollout (vLLM frees its KV cache there). Here the KV cache already
        died with its batch, but glibc keeps the freed pages, which the trainer's update then runs beside
        (measured: ~0.3 GB of the tiny demo's server).
        """
        async with self.scheduler.lock:
            cpu_platform.empty_host_cache()

    async def clear_kv_cache(self) -> None:
        """No-op: the KV cache lives only for the duration of one batch."""

    async def release_kv_cache(self) -> None:
        """No-op: the KV cache lives only for the duration of one batch."""

    async def resume_kv_cache(self) -> None:
        """No-op: the KV cache lives only for the duration of one batch."""

    async def wait_for_requests_to_drain(self) -> None:
        """Wait until the running batch (if any) is done."""
        async with self.scheduler.lock:
            return None

    async def start_profile(self, **kwargs) -> None:
        """No-op: profiling is not implemented."""

    async def stop_profile(self) -> None:
        """No-op: profiling is not implemented."""


def server_actor_name(rollout_name: str, replica_rank: int, suffix: str = "") -> str:
    """Ray actor name of a replica's server; the adapter in the trainer process looks it up by this name."""
    return f"{rollout_name}_server_{replica_rank}{suffix}"


def _replica_base():
    from verl.workers.rollout.replica import RolloutReplica

    return RolloutReplica


class HFRolloutReplica(_replica_base()):
    """One ``carl_hf`` server per replica, placed on the node of the replica's first trainer rank."""

    async def launch_servers(self) -> None:
        """Start the server actor (hybrid, colocated or standalone mode; verl fills ``self.workers`` first)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        from verl.plugin.platform import get_platform
        from verl.utils.device import get_resource_name

        if not self.workers:
            raise RuntimeError(f"carl_hf replica {self.replica_rank} has no workers; verl did not place the replica")
        resource = get_resource_name()
        node_id, accel_ids = await self.workers[0].__ray_call__.remote(
            lambda _self: (
                ray.get_runtime_context().get_node_id(),
                list(ray.get_runtime_context().get_accelerator_ids().get(resource, [])),
            )
        )
        platform = get_platform()
        env_vars = {var: "1" for var in platform.ray_noset_envvars()}
        if accel_ids:
            # Share the first trainer rank's accelerator, as vLLM's hybrid servers do; the server itself asks for
            # no Ray GPU/CPU so it never competes with the trainer's placement groups.
            env_vars[platform.visible_devices_envvar()] = ",".join(str(a) for a in accel_ids)
            env_vars.setdefault("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
        name = server_actor_name(self.config.name, self.replica_rank, self.name_suffix)
        server = (
            ray.remote(HFRolloutServer)
            .options(
                name=name,
                num_cpus=0,
                num_gpus=0,
                max_concurrency=self.max_concurrency,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                runtime_env={"env_vars": env_vars},
            )
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        # Only used as the load balancer's key: there is no HTTP endpoint.
        self._server_address = f"{name}@{node_id[:8]}"


def _adapter_base():
    from verl.workers.rollout.base import BaseRollout

    return BaseRollout


class HFServerAdapter(_adapter_base()):
    """Trainer-side handle of a ``carl_hf`` server: weight sync plus lifecycle no-ops.

    Built by verl inside every trainer rank as ``cls(config=, model_config=, device_mesh=)``.
    """

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world_size
        self.server_handle = None
        self.skip_sync = _truthy(os.environ.get(SKIP_SYNC_ENV))
        if self.skip_sync and self.rollout_rank == 0:
            logger.warning("carl_hf: %s=1, weights are NOT synced to the rollout (negative control)", SKIP_SYNC_ENV)

    def _server(self):
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_actor_name(self.config.name, self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]) -> None:
        """No-op: the server never releases its weights or cache."""

    async def release(self) -> None:
        """No-op: the server never releases its weights or cache."""

    @torch.no_grad()
    async def update_weights(self, weights, global_steps: int | None = None, wire_format: str = "named_tensors", **kw):
        """Drain ``weights`` on every rank; rank 0 of the replica ships them to its server in buckets.

        Args:
            weights: (Async) generator of ``(hf_name, tensor)``; iterating it runs FSDP collectives, so every rank
                must consume it fully.
            global_steps: Trainer step of these weights.
            wire_format: Only ``named_tensors``.
            **kw: ``peft_config`` (must be None: merge LoRA with ``model.lora.merge=True``), ``base_sync_done``.

        Raises:
            NotImplementedError: For delta flushes or unmerged LoRA adapters.
        """
        from verl.workers.rollout.utils import ensure_async_iterator

        if wire_format != "named_tensors":
            raise NotImplementedError(f"carl_hf supports wire_format='named_tensors' only, got {wire_format!r}")
        if kw.get("peft_config") is not None:
            raise NotImplementedError("carl_hf cannot apply LoRA adapters; set actor_rollout_ref.model.lora.merge=True")
        ship = self.rollout_rank == 0 and not self.skip_sync
        server = self._server() if ship else None
        if ship:
            await server.begin_weight_update.remote()
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        async for name, tensor in ensure_async_iterator(weights):
            if not ship:
                continue
            # Copy to host memory: the generator may reuse its buffer and Ray serialises host tensors only.
            host = tensor.detach().to("cpu", copy=True)
            bucket.append((name, host))
            size += host.numel() * host.element_size()
            if size >= BUCKET_BYTES:
                await server.load_weights.remote(bucket)
                bucket, size = [], 0
        if ship:
            if bucket:
                await server.load_weights.remote(bucket)
            await server.finish_weight_update.remote(global_steps)
        elif self.rollout_rank == 0 and global_steps is not None:
            await self._server().set_global_steps.remote(global_steps)


ADAPTER_FQDN = f"{__name__}.HFServerAdapter"
