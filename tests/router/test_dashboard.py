"""The dashboard in a real (headless) browser: it shows live data without a reload."""

from __future__ import annotations

from pathlib import Path

from tests.browser import chromium
from tests.servers import ROOT, router_app, wait_until

ARTIFACTS = ROOT / "tests" / "artifacts"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_dashboard_shows_sessions_and_calls_live(http, redis_server, tmp_path: Path):
    async with router_app(redis_server.url) as running, chromium(tmp_path / "profile") as page:
        await page.send("Page.navigate", url=f"{running.url}/dashboard")

        async def stat(name: str) -> str | None:
            return await page.evaluate(f"document.getElementById('stat-{name}')?.textContent")

        await wait_until(lambda: _equals(stat("sessions"), "0"))
        marker = await page.evaluate("window.pierMarker = 'same page'; window.pierMarker")

        async with http.post(
            f"{running.user_url('alice')}/tools/echo/call", json={"arguments": {"message": "hello dashboard"}}
        ) as response:
            assert response.status == 200
        async with http.post(f"{running.user_url('bob')}/tools/fail/call", json={"arguments": {"message": "x"}}):
            pass
        # A failed call of a traced caller: the recent errors show its trace id (what to look the call up by).
        traced = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
        async with http.post(f"{running.user_url('bob')}/tools/nope/call", json={}, headers=traced) as response:
            assert response.status == 404

        await wait_until(lambda: _equals(stat("sessions"), "2"))
        await wait_until(lambda: _equals(stat("calls"), "3"))
        sessions = await page.evaluate("document.getElementById('sessions').innerText")
        calls = await page.evaluate("document.getElementById('calls').innerText")
        tools = await page.evaluate("document.getElementById('tools').innerText")
        # The same page, updated in place (no reload lost our marker).
        assert await page.evaluate("window.pierMarker") == marker
        assert "alice" in sessions
        assert "bob" in sessions
        assert "echo" in calls
        assert "counter" in tools
        errors = await page.evaluate("document.getElementById('errors').innerText")
        assert "UNKNOWN_TOOL" in errors
        assert TRACE_ID in errors
        assert "live" in await page.evaluate("document.getElementById('live').textContent")
        await page.screenshot(ARTIFACTS / "dashboard.png")
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


async def _equals(value, expected: str) -> bool:
    return (await value) == expected
