"""`recipe.carl.loggers.check_wandb`: where wandb would find credentials, and the error when it would find none."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from carl_core import CARLConfigError
from recipe.carl.loggers import check_wandb


def config(logger):
    return OmegaConf.create({"trainer": {"logger": logger}})


NETRC = "machine api.wandb.ai\n  login user\n  password 0123456789012345678901234567890123456789\n"


@pytest.mark.parametrize(
    ("environ", "netrc", "source"),
    [
        ({"WANDB_API_KEY": "k"}, None, "WANDB_API_KEY"),
        ({"WANDB_IDENTITY_TOKEN_FILE": "/t"}, None, "WANDB_IDENTITY_TOKEN_FILE"),
        ({"WANDB_MODE": "offline"}, None, "WANDB_MODE=offline"),
        ({"WANDB_MODE": "disabled"}, None, "WANDB_MODE=disabled"),
        ({}, NETRC, "netrc"),  # what `wandb login` writes into ~/.netrc
    ],
)
def test_credentials_are_found_where_wandb_looks(environ, netrc, source, tmp_path):
    if netrc:
        (tmp_path / ".netrc").write_text(netrc)
    assert check_wandb(config(["console", "wandb"]), {"HOME": str(tmp_path), **environ}) == source


def test_the_netrc_entry_must_be_for_wandbs_host(tmp_path):
    """A self-hosted server (WANDB_BASE_URL) needs its own host's entry; NETRC names another file."""
    (tmp_path / "n").write_text(NETRC)
    environ = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "n")}
    assert check_wandb(config(["wandb"]), environ) == "netrc"
    with pytest.raises(CARLConfigError, match="no credentials for https://wandb.example.org"):
        check_wandb(config(["wandb"]), {**environ, "WANDB_BASE_URL": "https://wandb.example.org"})


def test_no_credentials_names_every_fix(tmp_path):
    with pytest.raises(CARLConfigError) as error:
        check_wandb(config(["console", "file", "wandb"]), {"HOME": str(tmp_path)})
    message = str(error.value)
    for fix in ("WANDB_API_KEY=<key>", "`wandb login`", "WANDB_MODE=offline", "LOGGER=console,file"):
        assert fix in message


@pytest.mark.parametrize("logger", [["console", "file"], "console", None])
def test_runs_without_wandb_are_not_checked(logger, tmp_path):
    assert check_wandb(config(logger), {"HOME": str(tmp_path)}) is None


def test_the_check_can_be_skipped(tmp_path):
    assert check_wandb(config("wandb"), {"HOME": str(tmp_path), "CARL_SKIP_WANDB_CHECK": "1"}) is None
