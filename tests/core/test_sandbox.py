"""The confinement of one server (`pier.core.sandbox`): its command line, and what it lets a server do."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pier.core import sandbox
from pier.core.sandbox import Confinement
from pier.sidecar.config import SidecarSettings

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pier-sandbox-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.unit
def test_uid_mode_runs_the_command_itself_under_its_uid(base):
    jail = Confinement("uid", base / "home", 1_200_007, 1_200_007)
    assert jail.command(["server", "--flag"]) == ["server", "--flag"]
    assert jail.spawn_options() == {"user": 1_200_007, "group": 1_200_007, "extra_groups": [], "umask": 0o077}
    assert jail.environment({"PATH": "/usr/bin", "HOME": "/root"}) == {
        "PATH": "/usr/bin", "HOME": str(base / "home"), "TMPDIR": str(base / "home" / "tmp"),
    }  # fmt: skip
    assert jail.exit_code(139) == 139  # the server's own status: no wrapper in between


@pytest.mark.unit
def test_a_sandbox_reports_a_death_by_signal_as_the_signal():
    jail = Confinement("sandbox", Path("/nowhere"))
    assert (jail.exit_code(3), jail.exit_code(128 + 11), jail.exit_code(128 + 9)) == (3, -11, -9)


@pytest.mark.unit
def test_confinements_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="unknown confinement mode"):
        Confinement("chroot", Path("/x"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uid mode needs a uid"):
        Confinement("uid", Path("/x"))
    with pytest.raises(ValueError, match="PIER_SIDECAR_ISOLATION must be one of"):
        SidecarSettings(isolation="jail", home=Path("/x"))
    with pytest.raises(ValueError, match="needs PIER_SIDECAR_HOME"):
        SidecarSettings(isolation="sandbox")
    with pytest.raises(ValueError, match="RUN_AS must be UID:GID"):
        SidecarSettings(isolation="uid", home=Path("/x"), run_as="alice")
    assert SidecarSettings().confinement() is None
    assert SidecarSettings(isolation="uid", home=Path("/x"), run_as="5000:5001").confinement() == Confinement(
        "uid", Path("/x"), 5000, 5001
    )


@pytest.mark.unit
def test_the_sandbox_binds_only_what_the_server_needs(base, monkeypatch):
    (base / "tools" / "inner").mkdir(parents=True)
    (base / "link").symlink_to(base / "tools")
    monkeypatch.setattr(sandbox, "runtime_paths", lambda: [str(base / "tools")])
    jail = Confinement("sandbox", base / "home", paths=(str(base / "tools" / "inner"), str(base / "link"), "/usr/x"))
    argv = jail.command(["server"])
    binds = [(argv[i + 1], argv[i + 2]) for i, arg in enumerate(argv) if arg == "--ro-bind"]
    tools = str(base / "tools")
    # Inner paths are covered by the outer one, system paths by the system's; a symlink leads to its target.
    assert (tools, tools) in binds
    assert (tools, str(base / "link")) in binds
    assert not [dest for _, dest in binds if dest.startswith(f"{tools}/")]
    assert "/usr/x" not in [dest for _, dest in binds]
    home = str(base / "home")
    assert argv[argv.index("--bind") : argv.index("--bind") + 5] == ["--bind", home, home, "--chdir", home]
    assert argv[argv.index("--") + 1 :] == ["server"]


@pytest.mark.unit
def test_a_sandbox_made_by_a_user_other_than_root_is_a_user_namespace(base, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    argv = Confinement("sandbox", base / "home").command(["server"])
    assert "--unshare-user" in argv
    assert "--cap-add" not in argv
    assert "setpriv" not in argv
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    argv = Confinement("sandbox", base / "home", 1_200_001, 1_200_001).command(["server"])
    assert "--unshare-user" not in argv
    assert argv[argv.index("--") + 1 : argv.index("--") + 4] == ["setpriv", "--reuid=1200001", "--regid=1200001"]


@root_only
def test_the_sandbox_of_a_user_other_than_root_confines_its_server(base, monkeypatch):
    # What a Pier that is not root runs: bubblewrap as that user (here uid 1_200_999, made by setpriv).
    # Its own runtime would be bound too; this one's lies under /root, which that user cannot read.
    user = 1_200_999
    monkeypatch.setattr(os, "geteuid", lambda: user)
    monkeypatch.setattr(sandbox, "runtime_paths", list)
    home = base / "home"
    (home / "tmp").mkdir(parents=True)
    shutil.chown(home, user, user)
    shutil.chown(home / "tmp", user, user)
    (base / "private").mkdir()
    # (the shell counts /proc's pids itself: a pipe would add its own processes)
    script = 'id -u; set -- /proc/[0-9]*; echo $#; touch "$HOME/mine" && echo home; touch "$0/x" || echo denied'
    jail = Confinement("sandbox", home)
    result = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
         *jail.command(["/bin/sh", "-c", script, str(base / "private")])],
        env=jail.environment({"PATH": "/usr/bin:/bin"}), cwd=jail.cwd(None), capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    # Its uid; its own pid namespace (bwrap's init and itself); its home; nothing of the machine's else.
    assert (result.returncode, result.stdout.split()) == (0, [str(user), "2", "home", "denied"]), result
    assert (home / "mine").exists()
    assert not (base / "private" / "x").exists()


@root_only
async def test_probes_say_what_works_and_why_not(base):
    home = base / "home"
    (home / "tmp").mkdir(parents=True)
    home.chmod(0o700)  # root's, private
    modes: tuple[sandbox.Mode, ...] = ("uid", "sandbox")
    for mode in modes:
        why = await sandbox.probe(Confinement(mode, home, 1_200_998, 1_200_998))
        assert why == f"uid 1200998 cannot use {home}"
    for path in (home, home / "tmp"):
        shutil.chown(path, 1_200_998, 1_200_998)
    assert await sandbox.probe(Confinement("uid", home, 1_200_998, 1_200_998)) is None
