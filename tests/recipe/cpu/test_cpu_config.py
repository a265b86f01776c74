"""device/cpu.yaml composes with verl's ppo_trainer and documents every key; the watchdog's pure logic."""

from pathlib import Path

import pytest

from recipe.carl.cpu import watchdog

CONFIG_DIR = Path(__file__).resolve().parents[3] / "recipe" / "carl" / "config"


@pytest.fixture(scope="module")
def cfg():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(
            config_name="carl_trainer", overrides=["+device=cpu", "actor_rollout_ref.model.path=/nonexistent"]
        )


def test_composes_with_ppo_trainer(cfg):
    assert cfg.actor_rollout_ref.rollout.name == "carl_hf"
    assert cfg.actor_rollout_ref.actor.strategy == "fsdp2" and cfg.actor_rollout_ref.ref.strategy == "fsdp2"
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert cfg.actor_rollout_ref.model.use_remove_padding is False
    assert cfg.ray_kwargs.ray_init.num_cpus >= 16 and cfg.ray_kwargs.ray_init.num_gpus == 1
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.CARL_DEVICE == "cpu"
    assert cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1
    assert cfg.trainer.device == "cpu" and cfg.data.dataloader_num_workers == 0
    # Keys verl's base config did not have are still composed in.
    assert cfg.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype == "fp32"


def test_sections_convert_to_verl_dataclasses(cfg):
    from verl.utils.config import omega_conf_to_dataclass

    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.name == "carl_hf" and rollout.tensor_model_parallel_size == 1
    engine = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor.fsdp_config)
    assert engine.mixed_precision["param_dtype"] == "fp32"


@pytest.mark.parametrize("name", ["cpu", "cpu_vllm"])
def test_every_key_has_a_comment_above(name):
    # verl's rule for its yamls: a comment above each field. A leaf may instead be the first child of a commented
    # parent (e.g. `# why\noverride_config:\n  attn_implementation: sdpa`).
    lines = (CONFIG_DIR / "device" / f"{name}.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or stripped.endswith(":"):
            continue  # blank, comment, list item or section header
        above = lines[i - 1].strip()
        parent_commented = above.endswith(":") and lines[i - 2].strip().startswith("#")
        assert above.startswith("#") or parent_commented, f"device/{name}.yaml line {i + 1} has no comment: {line!r}"


def test_watchdog_flags_only_old_pending_entries():
    first_seen = {"actor:a": 0.0, "pg:b": 50.0}
    assert watchdog.pending_for_too_long(first_seen, now=100.0, timeout_s=60) == ["actor:a"]
    assert watchdog.pending_for_too_long(first_seen, now=10.0, timeout_s=60) == []


def test_watchdog_disabled_by_zero_timeout():
    assert watchdog.start(timeout_s=0) is False
