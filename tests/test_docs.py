"""Docs that cannot drift: the README documents every setting the code reads (the settings models are
the source of truth), its Layout table names every module, its Redis table every name in Redis, and
its error table every error code with its status, and every source path the docs mention exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pier.core.errors import HTTP_STATUS
from pier.core.redis_keys import NAMES
from pier.jobs.config import JobsSettings
from pier.operator.config import OperatorSettings
from pier.router.config import RouterSettings
from pier.sidecar.config import ENV_PREFIX, SidecarSettings
from tests.servers import ROOT
from tools.observability import ALERTS

README = (ROOT / "README.md").read_text()
DOCS = ("README.md", "CONTRIBUTING.md", "docs/architecture.md")
# Component folder → its package below src/ (`router/` holds `pier.router`).
COMPONENTS = {name: ROOT / name / "src" / "pier" / name for name in
              ("core", "sidecar", "router", "jobs", "operator", "cli", "examples")}  # fmt: skip
TOP_FOLDERS = (*COMPONENTS, "tests", "tools", "bench", "docs", "deps", "charts", "deploy")
_FILE = re.compile(r"\.(py|md|sh|yml|yaml|toml|html|mjs|json)$")


@pytest.mark.parametrize("settings", [RouterSettings, JobsSettings, SidecarSettings, OperatorSettings])
def test_every_setting_is_documented(settings):
    if settings is SidecarSettings:  # a plain dataclass (the bridge does without pydantic)
        prefix, names = ENV_PREFIX, SidecarSettings.field_names()
    else:
        prefix, names = settings.model_config["env_prefix"], list(settings.model_fields)
    missing = [f"{prefix}{name.upper()}" for name in names if f"{prefix}{name.upper()}" not in README]
    assert not missing, f"undocumented settings: {missing}"


def _layout_rows() -> dict[str, str]:
    """The Layout table's rows, by their first cell's folder (`router/`, `tools/`, …)."""
    section = README[README.index("### Layout") :]
    section = section[: section.index("\n## ")]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([\w./-]+/?)`", line)
        if match:
            rows[match.group(1).rstrip("/")] = line
    return rows


def _modules(package: Path) -> list[str]:
    """A package's modules as the Layout table names them: `ingress`, `auth/ingress`, `backends/local/pool`."""
    return sorted(
        str(path.relative_to(package).with_suffix(""))
        for path in package.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    )


@pytest.mark.parametrize("folder", [*COMPONENTS, "tools"])
def test_the_layout_table_names_every_module(folder):
    rows = _layout_rows()
    assert folder in rows, f"the Layout table has no row for {folder}/"
    package = COMPONENTS.get(folder, ROOT / folder)
    missing = [m for m in _modules(package) if f"`{m}`" not in rows[folder]]
    assert not missing, f"{folder}/ modules the README's Layout table does not name: {missing}"


def test_the_redis_table_names_every_name_pier_uses():
    missing = [name.template for name in NAMES if f"`{name.template}`" not in README]
    assert not missing, f"Redis names the README does not list: {missing}"


def test_the_error_table_names_every_code_with_its_status():
    table = {}
    for codes, status in re.findall(r"^\| ((?:`[A-Z_]+`(?: / )?)+) \| (\d{3}) \|", README, re.MULTILINE):
        for code in re.findall(r"`([A-Z_]+)`", codes):
            table[code] = int(status)
    wrong = {code: (status, table.get(code)) for code, status in HTTP_STATUS.items() if table.get(code) != status}
    assert not wrong, f"error codes the README's table misses or gives another status (code: (status, README)): {wrong}"


def _resolves(reference: str) -> bool:
    """A path as the docs write it: from the repository's root, `router/…/x.py` (the package elided), or
    `router/x.py` (a module's path in its component)."""
    top, _, rest = reference.partition("/")
    candidates = [ROOT / reference]
    if top in COMPONENTS:
        candidates.append(COMPONENTS[top] / rest.removeprefix("…/"))
    return any(path.exists() for path in candidates)


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_the_docs_name_exists(doc):
    text = (ROOT / doc).read_text()
    references = re.findall(r"`((?:" + "|".join(TOP_FOLDERS) + r")/[^`\s{]*)`", text)
    paths = [ref for ref in references if _FILE.search(ref) or ref.endswith("/")]
    assert paths, f"{doc} names no path: the pattern is wrong"
    gone = sorted({ref for ref in paths if not _resolves(ref)})
    assert not gone, f"{doc} names paths that do not exist: {gone}"


def test_every_alert_has_its_runbook_in_the_readme():
    """The chart's alerts link `README.md#<alert>`: a heading of that name, and a paragraph under it."""
    section = README[README.index("### Alerts") :]
    section = section[: section.index("\n## ")]
    for alert in ALERTS:
        heading = f"#### {alert.name}\n\n"
        assert heading in section, f"no runbook for {alert.name} in the README's Alerts section"
        paragraph = section[section.index(heading) + len(heading) :].split("\n\n")[0]
        assert len(paragraph) > 200, f"{alert.name}: its runbook is a line, not a paragraph"
