"""`recipe.carl.evaluate.models`: a verl checkpoint's Hugging Face weights, its FSDP shards merged once with verl's
merger, hub ids, labels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from recipe.carl.evaluate import models
from recipe.carl.evaluate.settings import EvalError
from tests.recipe.evaluate.common import SHIPPED, fake_fsdp_checkpoint


def test_a_checkpoint_with_hf_weights_is_used_as_is(tmp_path):
    actor = fake_fsdp_checkpoint(tmp_path, with_hf_weights=True)
    assert models.resolve_model(actor) == actor / "huggingface"
    assert models.resolve_model(actor.parent) == actor / "huggingface"  # global_step_N works too
    assert models.model_label(actor / "huggingface") == "exp/global_step_1"


def test_fsdp_shards_are_merged_once_with_verls_merger(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    actor = fake_fsdp_checkpoint(tmp_path)
    merged = models.resolve_model(actor)
    assert merged == actor / "merged_hf" and (merged / "merged_from.json").exists()
    original, loaded = AutoModelForCausalLM.from_pretrained(str(SHIPPED)), AutoModelForCausalLM.from_pretrained(merged)
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name  # verl's FSDP merger saves bf16 weights
    # Reused while the shards are unchanged (the merger is not run again) ...
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: pytest.fail("merged twice"))
    assert models.resolve_model(actor) == merged
    # ... and merged again when they change; a failing merger is reported with its command.
    monkeypatch.setattr(
        models.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=3, stderr="boom", stdout="")
    )
    shard = actor / "model_world_size_1_rank_0.pt"
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(EvalError, match=r"model merger failed \(exit 3\): boom\ncommand: .*verl.model_merger merge"):
        models.resolve_model(actor)
    assert (merged / "model.safetensors").exists()  # the failed merge left the old folder in place
    other = tmp_path / "busy"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(EvalError, match="holds something else"):
        models.resolve_model(actor, merge_dir=other)


def test_a_hub_id_is_taken_from_the_hub_cache(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(SHIPPED))
    assert models.resolve_model("Qwen/Qwen2.5-7B-Instruct") == SHIPPED

    def offline(repo_id, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(EvalError, match=r"--model nobody/nothing: not a local folder, and the Hugging Face hub"):
        models.resolve_model("nobody/nothing")
