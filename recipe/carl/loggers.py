"""Start-up check of the loggers: wandb configured but not logged in stops the run in the driver, with the fix.

verl starts its loggers in the TaskRunner, a Ray worker, once the cluster, the models and the rollout servers are up;
there `wandb.init` without credentials and without a terminal fails with an error deep in a Ray traceback, minutes
into the run. The credentials wandb finds, in its order (`wandb.sdk.lib.wbauth.authenticate._use_system_auth`,
wandb 0.31): `WANDB_API_KEY`, `WANDB_IDENTITY_TOKEN_FILE`, then the netrc file (`NETRC`, else `~/.netrc`, which
`wandb login` writes) entry of the server's host (`WANDB_BASE_URL`, default https://api.wandb.ai). wandb's settings
file may also hold a key; `CARL_SKIP_WANDB_CHECK=1` skips the check for that case. `WANDB_MODE=offline` (or
`disabled`) needs no credentials.

Read with the standard library (`netrc`) rather than through wandb's own functions: those are internal
(`wandb.sdk.lib.wbauth`) and importing wandb costs the driver seconds.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import DictConfig, ListConfig

from carl_core import CARLConfigError

SKIP_ENV = "CARL_SKIP_WANDB_CHECK"
NO_CREDENTIALS_MODES = ("offline", "disabled", "dryrun")
DEFAULT_HOST = "https://api.wandb.ai"


def loggers(config: DictConfig) -> list[str]:
    """`trainer.logger` as a list (verl accepts one name or a list)."""
    value = config.trainer.get("logger")
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, ListConfig | list | tuple) else [str(value)]


def netrc_has(host_url: str, environ: Mapping[str, str]) -> bool:
    """Whether the netrc file wandb reads holds credentials for `host_url`'s host."""
    path = Path(environ["NETRC"]).expanduser() if environ.get("NETRC") else Path(environ.get("HOME", "~"), ".netrc")
    try:
        entries = netrc.netrc(str(path.expanduser()))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return entries.authenticators(urlsplit(host_url).netloc) is not None


def check_wandb(config: DictConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """Stops a run whose `trainer.logger` has wandb when wandb would find no credentials (module docstring).

    Returns:
        Where the credentials come from (`WANDB_API_KEY`, `netrc`, ...), or None when the check does not apply.

    Raises:
        CARLConfigError: naming the three fixes.
    """
    environ = os.environ if environ is None else environ
    if "wandb" not in loggers(config) or environ.get(SKIP_ENV) == "1":
        return None
    mode = environ.get("WANDB_MODE", "").lower()
    if mode in NO_CREDENTIALS_MODES:
        return f"WANDB_MODE={mode}"
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if environ.get(name):
            return name
    host = environ.get("WANDB_BASE_URL") or DEFAULT_HOST
    if netrc_has(host, environ):
        return "netrc"
    raise CARLConfigError(
        f"trainer.logger={loggers(config)} logs to wandb, but wandb has no credentials for {host} here (no "
        "WANDB_API_KEY, no netrc entry from `wandb login`): verl would fail inside a Ray worker once the models are "
        "loaded. Export WANDB_API_KEY=<key> (forwarded to every Ray worker; the safe choice on several nodes), or run "
        "`wandb login` on this machine, or set WANDB_MODE=offline (sync later with `wandb sync`), or drop wandb "
        f"(LOGGER=console,file in the run scripts, or trainer.logger=[console,file]). {SKIP_ENV}=1 skips this "
        "check (a key in wandb's settings file)."
    )
