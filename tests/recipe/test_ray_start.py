"""Secrets never printed (issue 28 item 4): the driver's whole start, `main_carl.run_carl` through verl's `run_ppo` and
the TaskRunner's first lines (verl's own code: it prints the Ray init arguments and the whole config), with Ray
faked, a fake `WANDB_API_KEY` and `HF_TOKEN` set, and the output captured at the file descriptors. The workers still
get the secrets, and `ray.init` gets what verl's own branch would give it (`recipe.carl.ray_start`)."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest
import ray
from hydra import compose, initialize_config_dir

from recipe.carl import preflight
from recipe.carl.main_carl import run_carl
from recipe.carl.ray_start import start_ray

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECRETS = {"WANDB_API_KEY": "fake-secret-123", "HF_TOKEN": "fake-hf-token-456"}
#: What verl's validate_config needs beyond the recipe's yaml (the run scripts set the same).
BASE = [
    "actor_rollout_ref.actor.use_dynamic_bsz=True",
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
    "trainer.val_before_train=False",
]
#: Variables verl's run_ppo sets in the driver before its ray.init; restored after each test.
VERL_ENV = ("VERL_FULL_DETERMINISM", "VLLM_BATCH_INVARIANT", "PYTHONHASHSEED", "VERL_RL_INSIGHT_ENABLE")


def compose_carl(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "recipe/carl/config"), version_base=None):
        return compose(config_name="carl_trainer", overrides=[*BASE, *overrides])


class StopAfterPrinting(Exception):
    """Raised where the TaskRunner would start TransferQueue: everything it prints before has been printed."""


class FakeRay:
    """`ray.init` / `ray.is_initialized` / `ray.get` without a cluster; records the init arguments."""

    def __init__(self, monkeypatch):
        self.inits: list[dict] = []
        monkeypatch.setattr(ray, "init", self.init)
        monkeypatch.setattr(ray, "is_initialized", lambda: bool(self.inits))
        monkeypatch.setattr(ray, "get", lambda ref: ref)

    def init(self, **kwargs):
        self.inits.append(kwargs)


def in_process(runner_class) -> SimpleNamespace:
    """verl's TaskRunnerV1 as `run_ppo` calls it (`.remote().run.remote(config)`), its real `run` in this process."""

    def remote() -> SimpleNamespace:
        runner = runner_class.__ray_metadata__.modified_class()
        return SimpleNamespace(run=SimpleNamespace(remote=runner.run))

    return SimpleNamespace(remote=remote)


#: A TaskRunner that does nothing.
NO_RUNNER = SimpleNamespace(remote=lambda: SimpleNamespace(run=SimpleNamespace(remote=lambda config: None)))


@pytest.fixture
def driver(monkeypatch, tmp_path):
    """Launch from a temporary folder with the fake secrets set, Ray faked, TransferQueue stopped at its start."""
    import transfer_queue
    import verl.trainer.main_ppo as main_ppo

    monkeypatch.chdir(tmp_path)
    for name in VERL_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(main_ppo, "TaskRunnerV1", in_process(main_ppo.TaskRunnerV1))
    monkeypatch.setattr(transfer_queue, "init", lambda *a, **k: (_ for _ in ()).throw(StopAfterPrinting()))
    monkeypatch.setattr(transfer_queue, "close", lambda *a, **k: None)
    return FakeRay(monkeypatch)


def test_the_drivers_output_never_holds_a_secret(driver, capfd):
    with pytest.raises(StopAfterPrinting):
        run_carl(compose_carl())
    out, err = capfd.readouterr()
    for name, value in SECRETS.items():
        assert value not in out and value not in err, name
    # verl's two prints ran (they are what this guards), with the secrets hidden
    assert "ray init kwargs:" in out and "'WANDB_API_KEY': '***'" in out
    assert "'trainer_mode': 'carl'" in out  # the TaskRunner's pprint of the whole config
    # ... and the workers still get the values: Ray was started once, by the driver, with them
    [kwargs] = driver.inits
    env = kwargs["runtime_env"]["env_vars"]
    assert {name: env[name] for name in SECRETS} == SECRETS


@pytest.mark.parametrize("overrides", [[], ["actor_rollout_ref.rollout.full_determinism=True"]], ids=["default", "det"])
def test_ray_starts_with_what_verls_own_branch_would_give_it(driver, monkeypatch, overrides):
    """Reference: verl's `run_ppo` with the secrets left in the config (before this fix), Ray not started."""
    config = compose_carl(*overrides)
    preflight.forward_environment(config)
    reference = config.copy()
    secrets = preflight.take_secrets(config)
    assert secrets == SECRETS and all(preflight.runtime_env_vars(config)[name] == "***" for name in SECRETS)
    ours = start_ray(config, secrets)

    import verl.trainer.main_ppo as main_ppo

    for name in VERL_ENV:  # as before the driver started: verl sets them itself
        monkeypatch.delenv(name, raising=False)
    driver.inits.clear()
    main_ppo.run_ppo(reference, task_runner_class=NO_RUNNER)
    [theirs] = driver.inits
    assert ours == theirs
    if overrides:
        assert ours["runtime_env"]["env_vars"]["VERL_FULL_DETERMINISM"] == "1"


def test_a_started_ray_is_kept_as_verl_keeps_it(driver, capfd):
    driver.inits.append({})  # Ray already started
    assert start_ray(compose_carl(), SECRETS) is None
    assert driver.inits == [{}]
    assert "WANDB_API_KEY" in capfd.readouterr().out  # named (not its value) as not forwarded
