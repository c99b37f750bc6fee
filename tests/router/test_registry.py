"""The MCP registry's format in and out: `pier catalog import` (a real process) turns server.json documents —
files and a URL — into a catalog the router loads, and the router serves its catalog back in the registry
API's shape (v0.1), each caller seeing only the servers they may use."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from aiohttp import web

from pier.cli.redis_server import free_port
from pier.core.catalog import Catalog, Profile, demo_profile
from pier.core.registry import SCHEMA
from tests.identity import OpenIdProvider
from tests.servers import PIER, get_json, router_app

WEATHER = {
    "$schema": SCHEMA, "name": "io.github.acme/weather", "description": "Weather forecasts", "version": "1.4.0",
    "packages": [{
        "registryType": "npm", "identifier": "@acme/weather-mcp", "version": "1.4.0", "transport": {"type": "stdio"},
        "packageArguments": [{"type": "named", "name": "--units", "default": "metric"}],
        "environmentVariables": [{"name": "WEATHER_API_KEY", "isSecret": True, "isRequired": True,
                                  "description": "your API key"}],
    }],
}  # fmt: skip
NOTES: dict[str, Any] = {
    "$schema": SCHEMA, "name": "io.github.acme/notes", "description": "Notes", "version": "0.3.0",
    "packages": [{"registryType": "pypi", "identifier": "acme-notes", "version": "0.3.0",
                  "transport": {"type": "stdio"},
                  "environmentVariables": [{"name": "NOTES_DIR", "value": "/srv/notes"}]}],
}  # fmt: skip
REMOTE = {"$schema": SCHEMA, "name": "io.github.acme/hosted", "description": "Hosted", "version": "2.0.0",
          "remotes": [{"type": "streamable-http", "url": "https://hosted.acme.example/mcp"}]}  # fmt: skip


@contextlib.asynccontextmanager
async def registry_answer(body: dict) -> AsyncIterator[str]:
    """A registry server answering `body` (as `…/v0.1/servers/{name}/versions/latest` would)."""

    async def latest(request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/v0.1/servers/{name}/versions/latest", latest)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        name = quote(str(NOTES["name"]), safe="")
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v0.1/servers/{name}/versions/latest"
    finally:
        await runner.cleanup()


async def test_pier_catalog_import_makes_profiles_and_refuses_what_it_cannot_run(tmp_path, redis_server):
    (tmp_path / "weather.json").write_text(json.dumps(WEATHER))
    (tmp_path / "hosted.json").write_text(json.dumps(REMOTE))
    (tmp_path / "broken.json").write_text("{not json")
    async with registry_answer({"server": NOTES, "_meta": {}}) as url:
        proc = await asyncio.create_subprocess_exec(
            *PIER, "catalog", "import", str(tmp_path / "weather.json"), url, str(tmp_path / "hosted.json"),
            str(tmp_path / "broken.json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1  # some were refused…
    refusals = err.decode().splitlines()
    assert len(refusals) == 2, refusals
    assert "hosted.json: io.github.acme/hosted is remote-only" in refusals[0] or "remote-only" in err.decode()
    assert any("broken.json: not JSON" in line for line in refusals)
    assert "Traceback" not in err.decode()

    # …and what could be imported is a catalog the router loads as it is.
    catalog = Catalog.parse(out.decode())
    weather, notes = catalog.profiles["weather"], catalog.profiles["notes"]
    assert weather.command == ["npx", "@acme/weather-mcp@1.4.0", "--units=metric"]
    assert set(weather.user_secrets) == {"WEATHER_API_KEY"}
    assert (notes.command, notes.env) == (["uvx", "acme-notes==0.3.0"], {"NOTES_DIR": "/srv/notes"})
    (tmp_path / "catalog.yaml").write_bytes(out)
    async with router_app(redis_server.url, Catalog.load(tmp_path / "catalog.yaml"), secrets_key=_key()) as running:
        assert sorted(running.router.catalog.profiles) == ["notes", "weather"]

    # One document, named, with a value for what it leaves open; usage errors are one line, exit 2.
    city = [{"type": "positional", "valueHint": "city", "isRequired": True}]
    (tmp_path / "city.json").write_text(
        json.dumps({**NOTES, "packages": [{**NOTES["packages"][0], "packageArguments": city}]})
    )
    proc = await asyncio.create_subprocess_exec(
        *PIER, "catalog", "import", str(tmp_path / "city.json"), "--name", "lisbon-notes", "--value", "city=Lisbon",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert Catalog.parse(out.decode()).profiles["lisbon-notes"].command == ["uvx", "acme-notes==0.3.0", "Lisbon"]
    proc = await asyncio.create_subprocess_exec(
        *PIER, "catalog", "import", str(tmp_path / "city.json"), "--value", "city", stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode().strip()) == (2, "pier catalog: --value takes NAME=VALUE, not 'city'")


def _key() -> str:
    import base64
    import os

    return base64.b64encode(os.urandom(32)).decode()


async def test_the_router_serves_its_catalog_in_the_registry_apis_shape(http, redis_server, tmp_path):
    weather = Profile(name="weather", description="Weather forecasts", command=["npx", "@acme/weather-mcp@1.4.0"],
                      version="1.4.0", registry_name="io.github.acme/weather")  # fmt: skip
    admin = Profile(name="admin-tools", command=demo_profile().command, allowed_groups=["admins"])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with (
        OpenIdProvider(tmp_path / "idp") as idp,
        router_app(
            redis_server.url, Catalog([weather, demo_profile(), admin]), port=port, public_url=base,
            oidc_issuer=idp.issuer, app_keys=["app-key"], registry_namespace="com.example.pier",
        ),
    ):  # fmt: skip
        staff = {"Authorization": "Bearer " + idp.sign({"sub": "alice", "aud": base, "groups": ["staff"]})}
        admins = {"Authorization": "Bearer " + idp.sign({"sub": "root", "aud": base, "groups": ["admins"]})}
        app = {"X-API-Key": "app-key"}

        async def names(headers: dict[str, str]) -> list[str]:
            listing = await get_json(http, f"{base}/v0.1/servers", headers)
            return [item["server"]["name"] for item in listing["servers"]]

        assert await names(staff) == ["com.example.pier/demo", "com.example.pier/weather"]
        everything = ["com.example.pier/admin-tools", "com.example.pier/demo", "com.example.pier/weather"]
        assert await names(admins) == everything
        assert await names(app) == everything

        listing = await get_json(http, f"{base}/v0.1/servers?limit=1", staff)
        [item] = listing["servers"]
        assert listing["metadata"] == {"nextCursor": "com.example.pier/demo", "count": 1}
        server = item["server"]
        assert server["$schema"] == SCHEMA
        assert server["remotes"] == [{"type": "streamable-http", "url": f"{base}/v1/me/servers/demo/mcp"}]
        assert item["_meta"]["io.modelcontextprotocol.registry/official"]["isLatest"] is True
        rest = await get_json(
            http, f"{base}/v0.1/servers?limit=1&cursor={quote(listing['metadata']['nextCursor'])}", staff
        )
        assert [i["server"]["name"] for i in rest["servers"]] == ["com.example.pier/weather"]
        assert "nextCursor" not in rest["metadata"]
        found = await get_json(http, f"{base}/v0.1/servers?search=weath", staff)
        assert [i["server"]["name"] for i in found["servers"]] == ["com.example.pier/weather"]

        latest = f"{base}/v0.1/servers/{quote('com.example.pier/weather', safe='')}/versions/latest"
        answer = await get_json(http, latest, staff)
        assert (answer["server"]["version"], answer["server"]["description"]) == ("1.4.0", "Weather forecasts")
        assert answer["server"]["_meta"]["dev.pier/profile"]["imported_from"] == "io.github.acme/weather"
        assert "npx" not in json.dumps(answer)  # never how it runs
        exact = await get_json(http, latest.replace("/latest", "/1.4.0"), staff)
        assert exact["server"]["name"] == "com.example.pier/weather"
        versions = await get_json(http, latest.removesuffix("/latest"), staff)
        assert [v["server"]["version"] for v in versions["servers"]] == ["1.4.0"]

        hidden = f"{base}/v0.1/servers/{quote('com.example.pier/admin-tools', safe='')}/versions/latest"
        for url, headers in ((hidden, staff), (latest.replace("/latest", "/9.9.9"), staff)):
            async with http.get(url, headers=headers) as response:
                assert response.status == 404
                assert set(await response.json()) == {"error"}  # the registry's error shape
        assert (await get_json(http, hidden, admins))["server"]["name"] == "com.example.pier/admin-tools"
        async with http.get(f"{base}/v0.1/servers") as response:
            assert response.status == 401

        # The same rule everywhere: the v1 listing, and a call.
        servers = await get_json(http, f"{base}/v1/servers", staff)
        assert [s["name"] for s in servers["servers"]] == ["weather", "demo"]
        async with http.get(f"{base}/v1/me/servers/admin-tools/tools", headers=staff) as response:
            assert response.status == 403
