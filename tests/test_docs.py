"""The README documents every setting the code reads (the settings models are the source of truth)."""

from __future__ import annotations

import pytest

from pier.jobs.config import JobsSettings
from pier.operator.config import OperatorSettings
from pier.router.config import RouterSettings
from pier.sidecar.config import ENV_PREFIX, SidecarSettings
from tests.servers import ROOT

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("settings", [RouterSettings, JobsSettings, SidecarSettings, OperatorSettings])
def test_every_setting_is_documented(settings):
    if settings is SidecarSettings:  # a plain dataclass (the bridge does without pydantic)
        prefix, names = ENV_PREFIX, SidecarSettings.field_names()
    else:
        prefix, names = settings.model_config["env_prefix"], list(settings.model_fields)
    missing = [f"{prefix}{name.upper()}" for name in names if f"{prefix}{name.upper()}" not in README]
    assert not missing, f"undocumented settings: {missing}"
