"""HFRolloutServer (in-process, no Ray) and HFServerAdapter (with a fake server handle)."""

import asyncio
import copy

import pytest
import torch

from recipe.carl.cpu.rollout import HFRolloutServer, HFServerAdapter
from recipe.carl.cpu.tiny_model import build_tiny_model, build_tokenizer


def _rollout_config(**kw):
    from verl.workers.config import RolloutConfig

    return RolloutConfig(name="carl_hf", prompt_length=64, response_length=16, tensor_model_parallel_size=1, **kw)


def _server(**kw) -> HFRolloutServer:
    return HFRolloutServer(
        _rollout_config(**kw), model_config=None, model=build_tiny_model(), tokenizer=build_tokenizer()
    )


PROMPT = build_tokenizer().encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
GREEDY = {"temperature": 0.0, "ignore_eos": True, "logprobs": True}


def test_generate_returns_token_output_with_vllm_semantics():
    server = _server()
    out = asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params={"logprobs": True}, request_id="r"))
    assert type(out).__name__ == "TokenOutput"
    # No max_tokens: vLLM's default budget, min(response_length, prompt_length + response_length - len(prompt)).
    assert 1 <= len(out.token_ids) <= 16 and len(out.log_probs) == len(out.token_ids)
    assert out.stop_reason == "completed" and out.extra_fields["global_steps"] is None
    # log-probs only when asked for, as vLLM does.
    out = asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params={"max_tokens": 3}, request_id="r"))
    assert out.log_probs is None and len(out.token_ids) <= 3


def test_generate_honours_max_tokens_and_stop_token_ids():
    server = _server()
    full = asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params={**GREEDY, "max_tokens": 8}, request_id="a"))
    assert len(full.token_ids) == 8
    stop = full.token_ids[2]
    params = {**GREEDY, "max_tokens": 8, "stop_token_ids": [stop]}
    cut = asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params=params, request_id="b"))
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop) + 1]


def test_generate_rejects_multimodal_and_unknown_params():
    server = _server()
    with pytest.raises(ValueError, match="text-only"):
        asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params={}, request_id="r", image_data=[object()]))
    with pytest.raises(ValueError, match="presence_penalty"):
        asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params={"presence_penalty": 1.0}, request_id="r"))


def test_concurrent_generate_calls_are_batched():
    server = _server()

    async def many():
        return await asyncio.gather(
            *[
                server.generate(prompt_ids=PROMPT + [65 + i], sampling_params=GREEDY, request_id=str(i))
                for i in range(8)
            ]
        )

    outs = asyncio.run(many())
    assert len(outs) == 8
    stats = asyncio.run(server.get_stats())
    assert stats["num_batches"] == 1 and stats["batch_sizes"] == [8]


def test_prefill_chunks_follow_max_num_batched_tokens():
    # verl's default (vLLM's bound on tokens per forward pass), and an explicit setting.
    assert _server().scheduler.engine.max_num_batched_tokens == 8192
    server = _server(max_num_batched_tokens=2 * (len(PROMPT) + 1))
    shapes = []
    server.model.register_forward_pre_hook(
        lambda _, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )

    async def many():
        params = {**GREEDY, "max_tokens": 2}
        return await asyncio.gather(
            *[
                server.generate(prompt_ids=PROMPT + [65 + i], sampling_params=params, request_id=str(i))
                for i in range(5)
            ]
        )

    asyncio.run(many())
    assert shapes[:3] == [(2, len(PROMPT) + 1), (2, len(PROMPT) + 1), (1, len(PROMPT) + 1)]


def test_sleep_trims_the_heap_and_keeps_serving(monkeypatch):
    import recipe.carl.cpu.platform as cpu_platform

    calls = []
    monkeypatch.setattr(cpu_platform, "empty_host_cache", lambda: calls.append(1))
    server = _server()
    params = {**GREEDY, "max_tokens": 4}
    before = asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params=params, request_id="a"))
    asyncio.run(server.sleep())
    after = asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params=params, request_id="b"))
    assert calls == [1] and after.token_ids == before.token_ids


def test_update_weights_changes_outputs_and_checksum():
    server = _server()
    before = asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params=GREEDY, request_id="x"))
    checksum0 = server.weights_checksum()
    other = build_tiny_model(seed=1)
    summary = asyncio.run(server.update_weights(list(other.state_dict().items()), global_steps=3))
    assert summary["missing"] == 0 and summary["checksum"] != checksum0
    assert summary["checksum"] == pytest.approx(sum(p.double().sum().item() for p in other.parameters()))
    after = asyncio.run(server.generate(prompt_ids=PROMPT, sampling_params=GREEDY, request_id="y"))
    assert after.token_ids != before.token_ids or after.log_probs != before.log_probs
    assert after.extra_fields["global_steps"] == 3


def test_update_weights_rejects_unknown_names_and_shapes():
    server = _server()
    with pytest.raises(ValueError, match="lacks"):
        asyncio.run(server.update_weights([("model.not_a_weight", torch.zeros(1))]))
    with pytest.raises(ValueError, match="shape"):
        asyncio.run(server.update_weights([("model.norm.weight", torch.zeros(3))]))


def test_abort_and_resume():
    server = _server()

    async def scenario():
        await server.abort_all_requests(reject_request=True)
        rejected = await server.generate(prompt_ids=PROMPT, sampling_params=GREEDY, request_id="r")
        await server.resume_generation()
        ok = await server.generate(prompt_ids=PROMPT, sampling_params={**GREEDY, "max_tokens": 2}, request_id="s")
        return rejected, ok

    rejected, ok = asyncio.run(scenario())
    assert rejected.stop_reason == "aborted" and rejected.token_ids == []
    assert ok.stop_reason == "completed" and len(ok.token_ids) == 2


class _Remote:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def remote(self, *args, **kwargs):
        self.log.append((self.name, copy.deepcopy(args), kwargs))

        async def done():
            return None

        return done()


class _FakeServer:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return _Remote(self.calls, name)


def _adapter(monkeypatch, rank: int, skip: bool = False) -> tuple[HFServerAdapter, _FakeServer]:
    monkeypatch.setenv("RANK", str(rank))
    if skip:
        monkeypatch.setenv("CARL_ROLLOUT_SKIP_WEIGHT_SYNC", "1")
    else:
        monkeypatch.delenv("CARL_ROLLOUT_SKIP_WEIGHT_SYNC", raising=False)
    from verl.workers.config import HFModelConfig

    adapter = HFServerAdapter(
        config=_rollout_config(), model_config=HFModelConfig.__new__(HFModelConfig), device_mesh=None
    )
    fake = _FakeServer()
    adapter.server_handle = fake
    return adapter, fake


def _weights(consumed: list):
    for i in range(3):
        consumed.append(i)
        yield f"w{i}", torch.full((2,), float(i))


def test_adapter_rank0_ships_weights(monkeypatch):
    adapter, fake = _adapter(monkeypatch, rank=0)
    consumed = []
    asyncio.run(adapter.update_weights(_weights(consumed), global_steps=5))
    assert consumed == [0, 1, 2]
    names = [c[0] for c in fake.calls]
    assert names == ["begin_weight_update", "load_weights", "finish_weight_update"]
    assert [n for n, _ in fake.calls[1][1][0]] == ["w0", "w1", "w2"]
    assert fake.calls[2][1] == (5,)


def test_adapter_other_ranks_drain_without_shipping(monkeypatch):
    # tp=1: rank 1 is rollout rank 0 of replica 1, so use tp=2 semantics via a rank that is not rollout rank 0.
    adapter, fake = _adapter(monkeypatch, rank=0)
    adapter.rollout_rank = 1
    consumed = []
    asyncio.run(adapter.update_weights(_weights(consumed), global_steps=5))
    assert consumed == [0, 1, 2] and fake.calls == []


def test_adapter_skip_env_is_a_negative_control(monkeypatch):
    adapter, fake = _adapter(monkeypatch, rank=0, skip=True)
    consumed = []
    asyncio.run(adapter.update_weights(_weights(consumed), global_steps=7))
    assert consumed == [0, 1, 2]
    assert [c[0] for c in fake.calls] == ["set_global_steps"]


def test_adapter_rejects_unmerged_lora(monkeypatch):
    adapter, _ = _adapter(monkeypatch, rank=0)
    with pytest.raises(NotImplementedError, match="lora.merge"):
        asyncio.run(adapter.update_weights(_weights([]), peft_config={"r": 8}))
