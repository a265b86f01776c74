"""The demo's `--rollout` choice: each backend maps to its device config, and `vllm` without vLLM fails at once."""

import pytest

from recipe.carl.cpu import vllm_cpu
from recipe.carl.tiny import config, demo


def test_each_rollout_maps_to_an_existing_device_config():
    for rollout, device in config.ROLLOUT_DEVICES.items():
        assert (config.REPO / "recipe" / "carl" / "config" / "device" / f"{device}.yaml").exists(), rollout
    assert config.DemoConfig().rollout == "carl_hf"
    with pytest.raises(ValueError, match="rollout 'sglang'"):
        config.DemoConfig(rollout="sglang")


def test_rollout_vllm_without_vllm_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(vllm_cpu.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv(vllm_cpu.VLLM_VENV_ENV, str(tmp_path / "no-venv"))
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--rollout", "vllm", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--rollout vllm:" in err and "install_cpu.sh --vllm" in err
    assert not (tmp_path / "run").exists()  # refused before anything was built
