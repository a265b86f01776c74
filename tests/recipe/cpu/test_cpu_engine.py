"""CausalLMEngine and BatchingScheduler: stopping, budgets, log-prob convention, batching (no Ray, no verl)."""

import asyncio
import functools

import pytest
import torch

from recipe.carl.cpu.engine import (
    BatchingScheduler,
    CausalLMEngine,
    SamplingSpec,
    parse_sampling_params,
    process_logits,
)
from recipe.carl.cpu.tiny_model import build_tiny_model, build_tokenizer


@functools.lru_cache(maxsize=1)
def _model_and_tokenizer():
    return build_tiny_model(), build_tokenizer()


def _engine(**kw) -> CausalLMEngine:
    model, tok = _model_and_tokenizer()
    return CausalLMEngine(model, [tok.eos_token_id], tok.pad_token_id, tokenizer=tok, **kw)


def _prompts(n: int) -> list[list[int]]:
    _, tok = _model_and_tokenizer()
    # Different lengths, so left padding is exercised.
    return [tok.encode("q" * (i + 1) + f" prompt number {i}") for i in range(n)]


def _teacher_forced_logprobs(prompt, tokens, temperature=1.0, top_k=-1, top_p=1.0, raw=False):
    model, _ = _model_and_tokenizer()
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens)])).logits[0, len(prompt) - 1 : -1].float()
    if raw:
        processed = logits
    else:
        n = logits.shape[0]
        processed = process_logits(
            logits,
            torch.full((n,), temperature),
            torch.full((n,), top_k, dtype=torch.long),
            torch.full((n,), top_p),
        )
    return torch.log_softmax(processed, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_max_tokens_is_honoured():
    res = _engine().generate(_prompts(3), [SamplingSpec(max_tokens=m, ignore_eos=True) for m in (1, 5, 9)])
    assert [len(r.token_ids) for r in res] == [1, 5, 9]
    assert all(r.finish_reason == "length" for r in res)
    assert all(len(r.log_probs) == len(r.token_ids) for r in res)


def test_stop_token_ends_request_and_is_kept():
    eng = _engine()
    prompt = _prompts(1)
    greedy = eng.generate(prompt, [SamplingSpec(max_tokens=12, temperature=0.0, ignore_eos=True)])[0]
    # Stop at the token greedy decoding emits 4th (first occurrence decides).
    stop_tok = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_tok)
    spec = SamplingSpec(max_tokens=12, temperature=0.0, stop_token_ids=frozenset({stop_tok}), ignore_eos=True)
    res = eng.generate(prompt, [spec])[0]
    assert res.token_ids == greedy.token_ids[: first + 1]
    assert res.finish_reason == "stop"


def test_eos_stops_unless_ignored():
    model, tok = _model_and_tokenizer()
    prompt = _prompts(1)
    greedy = _engine().generate(prompt, [SamplingSpec(max_tokens=6, temperature=0.0, ignore_eos=True)])[0]
    # Pretend the 2nd greedy token is the model's EOS.
    eng = CausalLMEngine(model, [greedy.token_ids[1]], tok.pad_token_id)
    stopped = eng.generate(prompt, [SamplingSpec(max_tokens=6, temperature=0.0)])[0]
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(greedy.token_ids[1]) + 1]
    ignored = eng.generate(prompt, [SamplingSpec(max_tokens=6, temperature=0.0, ignore_eos=True)])[0]
    assert ignored.token_ids == greedy.token_ids


def test_stop_string_ends_request():
    _, tok = _model_and_tokenizer()
    eng = _engine()
    prompt = _prompts(1)
    greedy = eng.generate(prompt, [SamplingSpec(max_tokens=10, temperature=0.0, ignore_eos=True)])[0]
    text = tok.decode(greedy.token_ids[2:4])
    res = eng.generate(prompt, [SamplingSpec(max_tokens=10, temperature=0.0, stop=(text,), ignore_eos=True)])[0]
    assert text in tok.decode(res.token_ids)
    assert len(res.token_ids) <= 4 and res.finish_reason == "stop"


@pytest.mark.parametrize(
    "temperature,top_k,top_p,mode",
    [
        (1.0, -1, 1.0, "processed_logprobs"),
        (0.7, -1, 1.0, "processed_logprobs"),
        (0.8, 20, 0.9, "processed_logprobs"),
        (0.7, -1, 1.0, "raw_logprobs"),
    ],
)
def test_logprobs_equal_teacher_forced_forward(temperature, top_k, top_p, mode):
    torch.manual_seed(0)
    eng = _engine(logprobs_mode=mode)
    prompts = _prompts(4)
    specs = [SamplingSpec(max_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, ignore_eos=True)] * 4
    for prompt, res in zip(prompts, eng.generate(prompts, specs), strict=True):
        ref = _teacher_forced_logprobs(prompt, res.token_ids, temperature, top_k, top_p, raw=mode == "raw_logprobs")
        assert torch.allclose(torch.tensor(res.log_probs), ref, atol=1e-5), (res.log_probs, ref)


def test_top_k_one_is_greedy():
    eng = _engine()
    prompts = _prompts(2)
    greedy = eng.generate(prompts, [SamplingSpec(max_tokens=8, temperature=0.0, ignore_eos=True)] * 2)
    topk1 = eng.generate(prompts, [SamplingSpec(max_tokens=8, temperature=1.0, top_k=1, ignore_eos=True)] * 2)
    assert [r.token_ids for r in greedy] == [r.token_ids for r in topk1]
    # Under top-k=1 the sampled token has all the processed probability mass.
    assert all(abs(lp) < 1e-6 for r in topk1 for lp in r.log_probs)


def test_seeded_requests_are_reproducible():
    eng = _engine()
    spec = SamplingSpec(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    a = eng.generate(_prompts(1), [spec])[0]
    b = eng.generate(_prompts(3), [spec, SamplingSpec(max_tokens=3), SamplingSpec(max_tokens=20)])[0]
    assert a.token_ids == b.token_ids


async def _concurrent(scheduler, prompts, spec):
    return await asyncio.gather(*[scheduler.submit(p, spec) for p in prompts])


def test_concurrent_requests_share_one_batch_and_match_sequential():
    prompts = _prompts(8)
    spec = SamplingSpec(max_tokens=10, temperature=0.0, ignore_eos=True)
    eng = _engine()
    sequential = [eng.generate([p], [spec])[0] for p in prompts]

    scheduler = BatchingScheduler(_engine(), batch_wait_ms=20)
    concurrent = asyncio.run(_concurrent(scheduler, prompts, spec))
    assert scheduler.batch_sizes == [8]
    assert [r.token_ids for r in concurrent] == [r.token_ids for r in sequential]
    for c, s in zip(concurrent, sequential, strict=True):
        assert torch.allclose(torch.tensor(c.log_probs), torch.tensor(s.log_probs), atol=1e-5)


def test_rows_finishing_early_are_retired_without_changing_others():
    prompts = _prompts(4)
    eng = _engine()
    budgets = [2, 12, 5, 12]
    mixed = eng.generate(prompts, [SamplingSpec(max_tokens=m, temperature=0.0, ignore_eos=True) for m in budgets])
    alone = [eng.generate([p], [SamplingSpec(max_tokens=12, temperature=0.0, ignore_eos=True)])[0] for p in prompts]
    for m, r, a in zip(budgets, mixed, alone, strict=True):
        assert r.token_ids == a.token_ids[:m]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chunked_prefill_matches_one_pass_and_bounds_each_forward(temperature):
    model, tok = _model_and_tokenizer()
    prompts = _prompts(7)
    width = max(len(p) for p in prompts)
    spec = SamplingSpec(max_tokens=10, temperature=temperature, ignore_eos=True)
    whole = _engine(max_num_batched_tokens=10**6).generate(prompts, [spec] * 7)
    widths = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        # 3 rows per prefill pass: chunks of 3, 3 and 1 rows.
        chunked = _engine(max_num_batched_tokens=3 * width + 1).generate(prompts, [spec] * 7)
    finally:
        hook.remove()
    assert widths[:3] == [(3, width), (3, width), (1, width)] and all(w[1] == 1 for w in widths[3:])
    for prompt, a, b in zip(prompts, whole, chunked, strict=True):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.log_probs), torch.tensor(b.log_probs), atol=1e-5)
        ref = _teacher_forced_logprobs(prompt, b.token_ids, max(temperature, 1.0))
        assert torch.allclose(torch.tensor(b.log_probs), ref, atol=1e-5)


def test_max_num_batched_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        _engine(max_num_batched_tokens=0)


def test_max_batch_size_splits_batches():
    scheduler = BatchingScheduler(_engine(), max_batch_size=3, batch_wait_ms=20)
    res = asyncio.run(_concurrent(scheduler, _prompts(7), SamplingSpec(max_tokens=3, ignore_eos=True)))
    assert len(res) == 7 and sorted(scheduler.batch_sizes) == [1, 3, 3]


def test_abort_ends_running_rows_with_partial_output():
    eng = _engine()
    calls = {"n": 0}

    def should_abort():
        calls["n"] += 1
        return calls["n"] >= 3

    res = eng.generate(_prompts(2), [SamplingSpec(max_tokens=50, ignore_eos=True)] * 2, should_abort=should_abort)
    assert all(r.finish_reason == "abort" and len(r.token_ids) == 3 for r in res)


def test_parse_sampling_params_defaults_and_errors():
    spec = parse_sampling_params(
        {"temperature": 0.5, "logprobs": True, "top_k": -1}, default_max_tokens=7, max_possible_tokens=100
    )
    assert (spec.max_tokens, spec.temperature, spec.logprobs, spec.top_k) == (7, 0.5, True, -1)
    assert (
        parse_sampling_params({"max_new_tokens": 500}, default_max_tokens=7, max_possible_tokens=100).max_tokens == 100
    )
    assert parse_sampling_params({"max_tokens": 0}, default_max_tokens=7, max_possible_tokens=100).max_tokens == 1
    with pytest.raises(ValueError, match="frequency_penalty"):
        parse_sampling_params({"frequency_penalty": 0.1}, default_max_tokens=7, max_possible_tokens=100)
    with pytest.raises(ValueError, match="repetition_penalty"):
        parse_sampling_params({"repetition_penalty": 1.2}, default_max_tokens=7, max_possible_tokens=100)
    with pytest.raises(ValueError, match="no room"):
        parse_sampling_params({}, default_max_tokens=7, max_possible_tokens=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_matches_teacher_forcing_and_batches():
    model = build_tiny_model().cuda()
    _, tok = _model_and_tokenizer()
    eng = CausalLMEngine(model, [tok.eos_token_id], tok.pad_token_id, tokenizer=tok)
    prompts = _prompts(8)
    spec = SamplingSpec(max_tokens=12, temperature=0.0, ignore_eos=True)
    scheduler = BatchingScheduler(eng, batch_wait_ms=20)
    batched = asyncio.run(_concurrent(scheduler, prompts, spec))
    assert scheduler.batch_sizes == [8]
    sequential = [eng.generate([p], [spec])[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in sequential]
    sampled = eng.generate(prompts, [SamplingSpec(max_tokens=12, temperature=0.8, ignore_eos=True)] * 8)
    for p, r in zip(prompts, sampled, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([p + r.token_ids], device="cuda")).logits[0, len(p) - 1 : -1].float()
        ref = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(r.token_ids, device="cuda")[:, None])
        assert torch.allclose(torch.tensor(r.log_probs), ref.squeeze(-1).cpu(), atol=1e-4)


def test_oov_rows_are_masked_like_verls_vllm_server():
    """A model with more embedding rows than tokens: ids >= vocab_size are never sampled and every log-prob is
    normalised over the real ids only (verl's vLLMHttpServer masks logits >= len(tokenizer) the same way)."""
    _, tok = _model_and_tokenizer()
    padded = build_tiny_model(vocab_size=len(tok) + 61, embed_std=0.5)
    with torch.no_grad():  # make the padded rows the most likely tokens, so an unmasked sampler picks them
        padded.lm_head.weight[len(tok) :] = padded.lm_head.weight[: len(tok)].abs().mean() * 40
    prompt = _prompts(2)
    specs = [
        SamplingSpec(max_tokens=8, temperature=1.0, ignore_eos=True, seed=3),
        SamplingSpec(max_tokens=8, temperature=0.0, ignore_eos=True),
    ]
    eng = CausalLMEngine(padded, [tok.eos_token_id], tok.pad_token_id, vocab_size=len(tok))
    for res, p in zip(eng.generate(prompt, specs), prompt, strict=True):
        assert max(res.token_ids) < len(tok), res.token_ids
        with torch.no_grad():
            logits = padded(torch.tensor([p + res.token_ids])).logits[0, len(p) - 1 : -1, : len(tok)].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(res.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(res.log_probs), expected, atol=1e-5, rtol=1e-5)
    unmasked = CausalLMEngine(padded, [tok.eos_token_id], tok.pad_token_id).generate(prompt, specs)
    assert any(max(r.token_ids) >= len(tok) for r in unmasked)  # the check above can fail


def test_tiny_model_vocabulary_equals_the_tokenizers():
    model, tok = _model_and_tokenizer()
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="too small"):
        build_tiny_model(vocab_size=len(tok) - 1)
