"""`recipe.carl.totals`: the running `carl/total/*` counts, and their way through a checkpoint into a resumed run."""

from __future__ import annotations

import json
import logging
import pathlib

import pytest
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from recipe.carl.totals import TOTALS_FILE, BudgetTotals, checkpoint_folder
from recipe.carl.trainer import CARLTrainer

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: Two steps' `compute_budget_stats`: 4 questions with 20.5 and 6.25 actions each (82 and 25), then 7 questions with
#: 61 and 29 actions in all (per question 61/7 and 29/7, which float arithmetic does not multiply back exactly).
STEP1 = {"carl/questions": 4.0, "carl/actions_generated_per_question": 20.5, "carl/actions_trained_per_question": 6.25,
         "carl/tokens_generated": 9000.0, "carl/tokens_trained": 2500.0}  # fmt: skip
STEP2 = {"carl/questions": 7.0, "carl/actions_generated_per_question": 61 / 7,
         "carl/actions_trained_per_question": 29 / 7, "carl/tokens_generated": 3000.0,
         "carl/tokens_trained": 1000.0}  # fmt: skip
AFTER_TWO = {"carl/total/questions": 11.0, "carl/total/actions_generated": 82.0 + 61.0,
             "carl/total/actions_trained": 25.0 + 29.0, "carl/total/tokens_generated": 12000.0,
             "carl/total/tokens_trained": 3500.0}  # fmt: skip


def test_totals_add_each_steps_counts():
    totals = BudgetTotals()
    assert totals.add(1, STEP1)["carl/total/actions_generated"] == 82.0
    assert 61 / 7 * 7 != 61 and totals.add(2, STEP2) == AFTER_TWO  # rounded back to whole counts
    assert totals.step == 2


def test_totals_survive_a_save_and_load(tmp_path, caplog):
    totals = BudgetTotals()
    totals.add(1, STEP1)
    totals.save(str(tmp_path))
    assert BudgetTotals.load(str(tmp_path), 1) == totals
    with pytest.raises(ValueError, match="counts up to step 1, but its checkpoint is step 2"):
        BudgetTotals.load(str(tmp_path), 2)
    (tmp_path / TOTALS_FILE).write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError, match="is not a totals record"):
        BudgetTotals.load(str(tmp_path), 1)
    with caplog.at_level(logging.WARNING):
        assert BudgetTotals.load(str(tmp_path / "old_checkpoint"), 7) == BudgetTotals()
    assert "restart at 0 from step 7" in caplog.text


def compose_carl(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "recipe/carl/config"), version_base=None):
        return compose(config_name="carl_trainer", overrides=list(overrides))


def test_checkpoint_folder_follows_the_resume_mode(tmp_path):
    auto = compose_carl(f"trainer.default_local_dir={tmp_path}/exp")
    assert checkpoint_folder(auto, 20) == f"{tmp_path}/exp/global_step_20"
    path = compose_carl("trainer.resume_mode=resume_path", f"trainer.resume_from_path={tmp_path}/x/global_step_5")
    assert checkpoint_folder(path, 5) == f"{tmp_path}/x/global_step_5"


def test_the_trainer_saves_its_totals_and_a_resumed_trainer_goes_on_counting(tmp_path, monkeypatch):
    """CARLTrainer's `_save_checkpoint` / `_load_checkpoint` around verl's own (stubbed: no workers here)."""
    monkeypatch.setattr(PPOTrainerSync, "_save_checkpoint", lambda self: None)
    resumed_at = {}
    monkeypatch.setattr(PPOTrainerSync, "_load_checkpoint", lambda self: setattr(self, "global_steps", resumed_at["s"]))
    config = compose_carl(f"trainer.default_local_dir={tmp_path}/exp")
    first = object.__new__(CARLTrainer)  # the attributes `_save_checkpoint` reads, without starting workers
    first.config, first.carl_totals, first.global_steps = config, BudgetTotals(), 2
    first.carl_totals.add(1, STEP1)
    first.carl_totals.add(2, STEP2)
    first._save_checkpoint()
    assert json.loads((tmp_path / "exp/global_step_2" / TOTALS_FILE).read_text())["actions_generated"] == 143

    resumed = object.__new__(CARLTrainer)
    resumed.config, resumed.carl_totals = config, BudgetTotals()
    resumed_at["s"] = 2
    resumed._load_checkpoint()
    assert resumed.carl_totals.metrics() == AFTER_TWO
    assert resumed.carl_totals.add(3, STEP1)["carl/total/actions_generated"] == 143.0 + 82.0
    resumed_at["s"] = 0  # a fresh run: nothing to read
    fresh = object.__new__(CARLTrainer)
    fresh.config, fresh.carl_totals = config, BudgetTotals()
    fresh._load_checkpoint()
    assert fresh.carl_totals == BudgetTotals()


def test_a_checkpoint_of_steps_that_counted_nothing_resumes(tmp_path, monkeypatch):
    """A run whose steps logged no budget (GRPO on verl's single-turn agent) saves zero totals at step 2; resuming
    from that checkpoint must read them back, not refuse them as another step's (the CPU resume test did)."""
    monkeypatch.setattr(PPOTrainerSync, "_save_checkpoint", lambda self: None)
    monkeypatch.setattr(PPOTrainerSync, "_load_checkpoint", lambda self: setattr(self, "global_steps", 2))
    config = compose_carl(f"trainer.default_local_dir={tmp_path}/exp")
    first = object.__new__(CARLTrainer)
    first.config, first.carl_totals, first.global_steps = config, BudgetTotals(), 2
    first._save_checkpoint()
    resumed = object.__new__(CARLTrainer)
    resumed.config, resumed.carl_totals = config, BudgetTotals()
    resumed._load_checkpoint()
    assert resumed.carl_totals == BudgetTotals(step=2)
