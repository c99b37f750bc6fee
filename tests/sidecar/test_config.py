"""The bridge's settings (a plain dataclass) and what a bridge imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pier.sidecar.config import Secret, SidecarSettings


def test_settings_come_from_the_environment_then_overrides():
    env = {
        "PIER_SIDECAR_PORT": "9000",
        "pier_sidecar_max_concurrent_calls": "4",  # names are case-insensitive, as before
        "PIER_SIDECAR_COMMAND": '["node", "server.js"]',
        "PIER_SIDECAR_TOKEN": "s3cret",
        "PIER_SIDECAR_CWD": "/srv",
        "PIER_SIDECAR_START_TIMEOUT_S": "2.5",
        "PIER_SIDECAR_WARM_UP": "true",
        "PIER_SIDECAR_UNKNOWN": "ignored",
        "PIER_OTHER": "ignored",
    }
    settings = SidecarSettings.from_env(env, port=0)
    assert settings.port == 0
    assert settings.max_concurrent_calls == 4
    assert settings.command == ["node", "server.js"]
    assert settings.token == Secret("s3cret")
    assert "s3cret" not in repr(settings)
    assert settings.cwd == Path("/srv")
    assert settings.start_timeout_s == 2.5
    assert settings.warm_up is True
    assert SidecarSettings.from_env({"PIER_SIDECAR_WARM_UP": "false"}).warm_up is False
    token = SidecarSettings(token="t").token  # type: ignore[arg-type]  # a str is taken too, as from the environment
    assert token is not None
    assert token.get_secret_value() == "t"


@pytest.mark.parametrize(
    "env",
    [
        {"PIER_SIDECAR_PORT": "70000"},
        {"PIER_SIDECAR_PORT": "eighty"},
        {"PIER_SIDECAR_MAX_CONCURRENT_CALLS": "0"},
        {"PIER_SIDECAR_START_TIMEOUT_S": "0"},
        {"PIER_SIDECAR_COMMAND": "node server.js"},
        {"PIER_SIDECAR_WARM_UP": "maybe"},
    ],
)
def test_bad_values_are_refused_naming_the_variable(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        SidecarSettings.from_env(env)


def test_a_bridge_imports_no_model_schema_settings_metrics_or_yaml_library():
    # They would cost every idle bridge megabytes and start-up time; jsonschema comes on first use. `pier sidecar`
    # is the `pier` command: its parser (every subcommand's, `catalog` included) is built before the bridge runs.
    code = (
        "import sys, pier.cli.main, pier.cli.catalog, pier.sidecar.main; "
        "from pier.sidecar.config import SidecarSettings; import pier.sidecar.app; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert not loaded & {"pydantic", "pydantic_settings", "jsonschema", "prometheus_client", "yaml"}
