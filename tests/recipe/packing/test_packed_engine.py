"""The packed-row engine: which rows it treats as packed, what it refuses, and (slow) verl's real FSDP2 engine on CPU
giving packed rows the per-path rows' log-probs, gradient and parameter change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recipe.carl.packing import RUNS_KEY, check_packing_config

REPO = Path(__file__).resolve().parents[3]
CHECK = Path(__file__).with_name("engine_check.py")


def _td(rows):
    """verl's V1 layout of rows given as (prompt length, response length, trained tokens, runs or None)."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    fields = []
    for p, r, trained, runs in rows:
        mask = torch.zeros(r, dtype=torch.long)
        mask[:trained] = 1
        fields.append(
            {
                "prompts": torch.arange(p),
                "responses": torch.arange(r),
                "input_ids": torch.arange(p + r),
                "response_mask": mask,
                "extra_fields": {} if runs is None else {RUNS_KEY: runs},
            }
        )
    return list_of_dict_to_tensordict(fields)


def test_rows_without_runs_leave_the_micro_batch_to_verl():
    from recipe.carl.packing.engine import packed_runs

    assert packed_runs(_td([(3, 4, 1, None), (2, 2, 1, None)])) is None


def test_packed_rows_and_padding_rows():
    from recipe.carl.packing.engine import packed_runs

    runs = [[3, -1], [2, 0], [2, 0]]
    # a packed row; verl's padding row (another row's extra_fields, 128 tokens, nothing trained): causal
    got = packed_runs(_td([(3, 4, 2, runs), (127, 1, 0, runs), (2, 2, 1, None)]))
    assert got == [runs, None, None]


def test_runs_that_do_not_fit_a_trained_row_are_an_error():
    from recipe.carl.packing.engine import packed_runs

    with pytest.raises(ValueError, match="packed row 0 has 8 tokens but its carl_tree_runs describe 7"):
        packed_runs(_td([(3, 5, 2, [[3, -1], [2, 0], [2, 0]])]))


def test_mini_batches_keep_the_runs():
    """verl's update splits a batch with `make_iterator`; every mini-batch row keeps its own runs."""
    from verl.utils import tensordict_utils as tu

    td = _td([(3, 4, 1, [[3, -1], [4, 0]]), (2, 2, 1, None), (3, 3, 1, [[3, -1], [3, 0]]), (2, 5, 1, None)])
    seen = []
    for mini in tu.make_iterator(td, mini_batch_size=2, epochs=1, seed=0, dataloader_kwargs={"shuffle": True}):
        for extra, ids in zip(tu.get(mini, "extra_fields"), mini["input_ids"].unbind(), strict=True):
            runs = extra.get(RUNS_KEY)
            assert runs is None or sum(n for n, _ in runs) == len(ids)
            seen.append(runs is not None)
    assert sorted(seen) == [False, False, True, True]


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_per_sequence_loss_aggregation_is_refused_by_name(mode):
    from verl.workers.utils.losses import ppo_loss

    from recipe.carl.packing.engine import check_loss_aggregation

    class Cfg:
        loss_agg_mode = mode

    with pytest.raises(ValueError, match=f"loss_agg_mode={mode} averages per row"):
        check_loss_aggregation(partial(ppo_loss, config=Cfg()))
    Cfg.loss_agg_mode = "token-mean"
    check_loss_aggregation(partial(ppo_loss, config=Cfg()))


def _config(device="cpu", **actor):
    return OmegaConf.create(
        {
            "trainer": {"device": device},
            "data": {"max_prompt_length": 100, "max_response_length": 900},
            "actor_rollout_ref": {
                "actor": {"loss_agg_mode": "token-mean", "ulysses_sequence_parallel_size": 1, **actor},
                "model": {"override_config": {"attn_implementation": "sdpa"}, "use_fused_kernels": False},
                "rollout": {"log_prob_max_token_len_per_gpu": 4000},
                "ref": {},
            },
        }
    )


def test_config_check_names_each_setting():
    assert check_packing_config(_config(), "tree") == []
    assert check_packing_config(_config(loss_agg_mode="seq-mean-token-mean"), "path") == []
    problems = check_packing_config(
        _config(loss_agg_mode="seq-mean-token-sum", ulysses_sequence_parallel_size=2), "tree"
    )
    assert "actor_rollout_ref.actor.loss_agg_mode" in problems[0] and "seq-mean-token-sum" in problems[0]
    assert "ulysses_sequence_parallel_size=1" in problems[1]
    cfg = _config()
    cfg.actor_rollout_ref.model.override_config = {}  # verl's default: flash_attention_2
    (problem,) = check_packing_config(cfg, "tree")
    # the key is not in the config: Hydra takes it only with a leading + (override_config is a struct node)
    assert problem.startswith("+actor_rollout_ref.model.override_config.attn_implementation=flex_attention (got ")
    assert "'flash_attention_2': it cannot take a tree mask" in problem
    # with dynamic batch sizes a packed row is bounded by the smallest per-GPU token budget, which must hold a path
    cfg = _config(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=800)
    (problem,) = check_packing_config(cfg, "tree")
    assert "data.max_prompt_length + data.max_response_length = 1000 (got 800" in problem
    assert check_packing_config(_config(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=8000), "tree") == []


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_mask_attention_is_for_cpu_only(attn):
    """sdpa and eager take the tree mask as a dense T x T tensor: fine on CPU (tested), refused on a GPU."""
    cfg = _config()
    cfg.actor_rollout_ref.model.override_config.attn_implementation = attn
    assert check_packing_config(cfg, "tree") == []
    cfg.trainer.device = "cuda"
    (problem,) = check_packing_config(cfg, "tree")
    # the key is in the config here, so the override has no +
    assert problem.startswith(
        f"actor_rollout_ref.model.override_config.attn_implementation=flex_attention (got {attn!r}"
    )
    assert "dense T x T mask" in problem and "sdpa and eager are for CPU runs" in problem
    cfg.actor_rollout_ref.model.override_config.attn_implementation = "flex_attention"
    assert check_packing_config(cfg, "tree") == []


class _Model(torch.nn.Module):
    """Stands in for the FSDP-wrapped model: its attention setting and an LM head to hook."""

    def __init__(self, attn: str):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": attn})()
        self.head = torch.nn.Linear(2, 2)

    def get_output_embeddings(self):
        return self.head


def _engine(attn: str = "flex_attention"):
    from recipe.carl.packing.engine import PassTimer, TreePackedFSDPEngine

    engine = object.__new__(TreePackedFSDPEngine)  # no FSDP set-up: only the methods under test run
    engine.module = _Model(attn)
    engine._carl_timer = PassTimer(log=(logged := []).append)
    return engine, logged


def test_engine_refuses_dense_mask_attention_off_the_cpu():
    engine, _ = _engine("sdpa")
    on_cpu = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.zeros(1, 4, dtype=torch.long)}
    engine._check_packing_supported(on_cpu)
    off_cpu = {k: v.to("meta") for k, v in on_cpu.items()}  # any device but the CPU, as a GPU's would be
    with pytest.raises(ValueError, match=r"packing=tree needs .*attn_implementation=flex_attention .*got 'sdpa'"):
        engine._check_packing_supported(off_cpu)


def test_pass_timer_states_the_first_pass_compilation():
    from recipe.carl.packing.engine import PassTimer

    timer = PassTimer(log=(logged := []).append)
    first = timer.record("update", 80.0, 1000)
    assert first.startswith("first packed update pass (flex_attention): 80.0 s for 1000 tokens (flex attention comp")
    # the second pass ran 2000 tokens in 10 s: the first pass's 1000 tokens account for 5 s of its 80 s
    second = timer.record("update", 10.0, 2000)
    assert (
        "the first pass took ~75.0 s beyond its share of tokens at this pass's rate: flex attention's compil" in second
    )
    assert timer.record("update", 9.0, 2000) is None and not timer.active("update")
    assert timer.active("log-prob") and len(logged) == 2 and logged[0] == f"[carl packing] {first}"
    # other attention implementations compile nothing: the lines say only what was measured
    first = timer.record("log-prob", 1.0, 100, attn="sdpa")
    second = timer.record("log-prob", 3.0, 200, attn="sdpa")  # faster per token at first: nothing beyond its share
    assert "compile" not in first + second and second.endswith(
        "took ~0.0 s beyond its share of tokens at this pass's rate"
    )


def test_engine_times_only_passes_with_packed_rows(monkeypatch):
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    def passes(self, data, loss_function, forward_only=False):  # verl's loop over micro-batches, in short
        return [self.forward_step(data, loss_function, forward_only)]

    monkeypatch.setattr(FSDPEngineWithLMHead, "forward_backward_batch", passes)
    monkeypatch.setattr(FSDPEngineWithLMHead, "forward_step", lambda self, mb, loss, fwd: (None, {}))
    engine, logged = _engine()
    runs = [[3, -1], [2, 0], [2, 0]]
    packed, plain = _td([(3, 4, 2, runs), (2, 2, 1, None)]), _td([(3, 4, 2, None)])
    engine.forward_backward_batch(plain, None, forward_only=True)
    assert logged == []
    for _ in range(3):
        engine.forward_backward_batch(packed, None, forward_only=True)
    engine.forward_backward_batch(packed, None, forward_only=False)
    assert [line.split(":")[0] for line in logged] == [
        "[carl packing] first packed log-prob pass (flex_attention)",
        "[carl packing] second packed log-prob pass (flex_attention)",
        "[carl packing] first packed update pass (flex_attention)",
    ]
    assert "s for 11 tokens" in logged[0]  # 3 + 4 and 2 + 2 tokens


def test_engines_of_a_process_share_one_timer(monkeypatch):
    """Compiled code is per process: the reference engine's first pass after the actor's is its second."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from recipe.carl.packing import engine as engine_module

    monkeypatch.setattr(engine_module, "PROCESS_TIMER", engine_module.PassTimer(log=(logged := []).append))
    monkeypatch.setattr(
        FSDPEngineWithLMHead, "forward_backward_batch", lambda self, d, f, o=False: [self.forward_step(d, f, o)]
    )
    monkeypatch.setattr(FSDPEngineWithLMHead, "forward_step", lambda self, mb, loss, fwd: (None, {}))
    packed = _td([(3, 4, 2, [[3, -1], [2, 0], [2, 0]])])
    for _ in range(2):  # actor, then reference
        engine, _ = _engine()
        engine._carl_timer = None
        engine.forward_backward_batch(packed, None, forward_only=True)
    assert [line.split(" pass")[0] for line in logged] == [
        "[carl packing] first packed log-prob",
        "[carl packing] second packed log-prob",
    ]


def _run_check(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    env.update(CARL_DEVICE="cpu", CARL_RAY_PENDING_TIMEOUT_S="0", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(CHECK), *args], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.parametrize("args", [(), ("--remove-padding", "--loss-agg-mode", "token-sum")])
def test_verl_engine_packed_rows_equal_per_path_rows(args):
    res = _run_check(*args)
    assert res["engine"] == "TreePackedFSDPEngine" and res["refused"] == [] and res["trained_tokens"] > 20
    assert res["max_abs_logp_diff"] <= 1e-5  # the old-log-prob pass
    # one update step: SGD moves the weights by -lr * (clipped) gradient, AdamW's first step by ~lr * sign(gradient)
    assert res["SGD_max_grad_diff_rel"] < 1e-5 and res["AdamW_max_grad_diff_rel"] < 1e-5
    assert res["SGD_max_delta_diff_rel"] < 1e-4  # (fp32 rounding of weights near 1, e.g. norm gains)


def test_row_budget_is_what_one_micro_batch_holds():
    from recipe.carl.packing import packing_budget

    # dynamic batch sizes: the smallest per-GPU token budget of the passes that run the row, minus the prompt
    cfg = _config(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=8000)
    assert packing_budget(cfg, prompt_length=30) == 4000 - 30
    cfg.actor_rollout_ref.ref.log_prob_max_token_len_per_gpu = 2000
    assert packing_budget(cfg, prompt_length=30) == 2000 - 30
    # fixed micro-batch row counts: verl's usual row length
    assert packing_budget(_config(use_dynamic_bsz=False), prompt_length=30) == 900


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_flex_attention_micro_batches_compile_with_dynamic_sizes(monkeypatch, attn):
    """Every micro-batch (packed or not) runs verl's forward step inside `dynamic_lengths` under flex attention: its
    length then does not recompile flex attention (the graph counts: tests/benchmarks/test_gpu_check.py)."""
    import torch._dynamo
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    seen = []

    def forward_step(self, micro_batch, loss_function, forward_only):
        seen.append(torch._dynamo.config.assume_static_by_default)
        return None, {}

    monkeypatch.setattr(FSDPEngineWithLMHead, "forward_step", forward_step)
    engine, _ = _engine(attn)
    for rows in ([(3, 4, 2, [[3, -1], [2, 0], [2, 0]])], [(3, 4, 2, None)]):
        engine.forward_step(_td(rows), None, forward_only=True)
    assert seen == [attn != "flex_attention"] * 2
    assert torch._dynamo.config.assume_static_by_default  # restored after the step
