"""The paper's action space end to end on a CPU: `python -m recipe.carl.tiny.demo --tiny --action-space paper` makes
SynthHop's pages variant, reuses the shipped start of 300 SFT steps on its demonstrations (search, access, read,
answer; `recipe/carl/tiny/checkpoints/pages_smoke_seed0`, rebuilt by the command in its manifest), serves pages over
`POST /access`, and runs 2 CARL steps through verl's real trainer with `algorithm.carl.action_space=paper`.

Slow: about 2 min (trainer start-up, 2 validations, 2 RL steps; docs/measurements.md). What the trees' page parts do in
training (never trained, -1 in `carl_token_nodes`) is checked through verl's own row post-processing in
`tests/recipe/test_paper_agent_loop.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from recipe.carl.io import read_jsonl
from recipe.carl.tiny import cli
from recipe.carl.tiny.config import PAGES_SMOKE_SFT_STEPS, SHIPPED_PAGES_SMOKE_SFT, DemoConfig
from recipe.carl.tiny.demo import trainer_overrides
from tests.core.support import check_tree_record

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def pages_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pages") / "run"
    argv = ["--tiny", "--action-space", "paper", "--run-dir", str(run_dir)]
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.carl.tiny.demo", *argv], cwd=REPO, capture_output=True, text=True, timeout=2400
    )
    return run_dir, proc


@pytest.mark.slow
def test_access_and_read_actions_grow_in_carls_trees_through_verls_trainer(pages_run):
    run_dir, proc = pages_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["config"]["pages"] == {"snippet_words": 5, "chunk_chars": 64}
    sft = json.loads((run_dir / "policy_sft" / "sft_manifest.json").read_text())
    assert sft["result"]["steps"] == PAGES_SMOKE_SFT_STEPS and sft["key"]["action_space"] == "paper"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft"]["shipped"] == str(SHIPPED_PAGES_SMOKE_SFT), summary["sft"]  # CI trains no start
    dumps = sorted((run_dir / "ckpt" / "carl_trees").glob("step_*.jsonl"))
    assert len(dumps) == 2
    kinds: Counter = Counter()
    for dump in dumps:
        for record in read_jsonl(dump):
            check_tree_record(record)  # values, advantages and the update set hold with the new actions too
            kinds.update(n["kind"] for n in record["nodes"] if n["parent"] is not None)
    assert kinds["access"] > 0 and kinds["read"] > 0 and kinds["search"] > 0, kinds
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["data"] for r in rows if r["step"] in (1, 2) and "carl/trees" in r["data"]]
    assert len(steps) == 2
    for metrics in steps:
        assert metrics["carl/kind_generated/access"] > 0 and "carl/kind_trained/read" in metrics
        assert metrics["search/accesses"] > 0 and metrics["search/errors"] == 0


def test_the_pages_demo_is_one_flag_and_composes_against_verls_config(tmp_path):
    """`--action-space paper` sets the pages variant's sizes and the trainer's action space, nothing else."""
    p = cli.parser()
    args = p.parse_args(["--tiny", "--action-space", "paper", "--run-dir", str(tmp_path / "run")])
    cfg = cli.config_from(args, p)
    assert cfg == DemoConfig.tiny().with_pages(smoke=True)
    assert (cfg.action_space, cfg.max_actions, cfg.sft_steps, cfg.sft_time_budget_s) == ("paper", 14, 300, None)
    overrides = trainer_overrides(cfg, tmp_path, tmp_path / "data", tmp_path / "sft", tmp_path / "pages_tool.yaml")
    assert "algorithm.carl.action_space=paper" in overrides and "algorithm.carl.page_chunk_chars=64" in overrides
    assert not any("action_space" in o for o in trainer_overrides(DemoConfig(), tmp_path, tmp_path, tmp_path, tmp_path))
    from hydra import compose, initialize_config_dir

    from recipe.carl.settings import check_trainer_config

    with initialize_config_dir(config_dir=str(REPO / "recipe" / "carl" / "config"), version_base=None):
        config = compose(config_name="carl_trainer", overrides=["+demo=tiny_cpu", "+device=cpu", *overrides])
    settings = check_trainer_config(config)
    assert (settings.action_space, settings.page_chunk_chars, settings.carl.max_actions) == ("paper", 64, 14)
    with pytest.raises(SystemExit):
        cli.config_from(p.parse_args(["--policy", "smollm2", "--action-space", "paper"]), p)
