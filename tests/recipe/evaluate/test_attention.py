"""A checkpoint trained with tree packing records `attn_implementation: flex_attention` in its `config.json` (verl's
own config path, run here: `AutoConfig` with the override, `update_model_config`, `save_pretrained` as verl's
checkpoint manager does); the evaluation's HF engine keeps its own attention (`engines.EVAL_ATTENTION`)."""

from __future__ import annotations

import json
import shutil

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from verl.utils.model import update_model_config

from recipe.carl.evaluate.engines import EVAL_ATTENTION, HFEngine
from recipe.carl.evaluate.settings import EvalSettings
from tests.recipe.evaluate.common import SHIPPED


def flex_checkpoint(tmp_path):
    """The shipped policy with the `huggingface/` config a tree-packing run's checkpoint gets."""
    folder = tmp_path / "huggingface"
    shutil.copytree(SHIPPED, folder)
    override = {"attn_implementation": "flex_attention"}  # +actor_rollout_ref.model.override_config.attn_...
    config = AutoConfig.from_pretrained(folder, attn_implementation=override["attn_implementation"])
    update_model_config(config, override)  # verl/workers/config/model.py, HFModelConfig
    config.save_pretrained(folder)  # verl/utils/checkpoint/fsdp_checkpoint_manager.py, into <actor>/huggingface
    return folder


def test_a_tree_packing_checkpoint_records_flex_attention(tmp_path):
    folder = flex_checkpoint(tmp_path)
    assert json.loads((folder / "config.json").read_text())["attn_implementation"] == "flex_attention"
    assert "attn_implementation" not in json.loads((SHIPPED / "config.json").read_text())
    # loaded as it is, transformers takes it up
    assert AutoModelForCausalLM.from_pretrained(folder).config._attn_implementation == "flex_attention"


def test_the_hf_engine_keeps_its_own_attention(tmp_path):
    folder = flex_checkpoint(tmp_path)
    engine = HFEngine(folder, AutoTokenizer.from_pretrained(folder), EvalSettings())
    assert engine.server.model.config._attn_implementation == EVAL_ATTENTION == "sdpa"
