"""Headless Chromium driven over the DevTools protocol (aiohttp WebSocket; no extra packages): navigate,
read the page, fill forms and click as a user would, take screenshots."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

# Flags for a machine with no network beyond loopback (see the environment notes).
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000",
]  # fmt: skip


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        await self.ws.send_json({"id": message_id, "method": method, "params": params})
        async for message in self.ws:
            data = message.json()
            if data.get("id") == message_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
        raise RuntimeError("the browser closed the connection")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of `expression` once it is truthy (the page may be loading meanwhile)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                value = await asyncio.wait_for(self.evaluate(expression), 10)
            except (RuntimeError, TimeoutError):
                value = None  # (between two pages: no context to evaluate in yet)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the page never had {expression}: it is at {await self.location()}")
            await asyncio.sleep(0.1)

    async def location(self) -> str:
        try:
            return str(await asyncio.wait_for(self.evaluate("location.href"), 10))
        except (RuntimeError, TimeoutError):
            return "(loading)"

    async def loaded(self, selector: str, timeout: float = 30.0) -> None:
        """Wait until the page has loaded and holds `selector`."""
        query = json.dumps(selector)
        await self.wait_for(f"document.readyState === 'complete' && !!document.querySelector({query})", timeout)

    async def text(self, selector: str) -> str:
        return str(await self.evaluate(f"document.querySelector({json.dumps(selector)})?.innerText ?? ''"))

    async def fill(self, selector: str, value: str) -> None:
        """Type `value` into the field `selector` (as its value, with the input events a user's typing fires)."""
        field = f"document.querySelector({json.dumps(selector)})"
        script = (
            f"(() => {{ const field = {field}; field.value = {json.dumps(value)};"
            " field.dispatchEvent(new Event('input', {bubbles: true})); return true; })()"
        )
        assert await self.evaluate(script), selector

    async def click(self, selector: str) -> None:
        assert await self.evaluate(
            f"(() => {{ document.querySelector({json.dumps(selector)}).click(); return true; }})()"
        )

    async def html(self) -> str:
        return str(await self.evaluate("document.documentElement.outerHTML"))

    async def screenshot(self, path: Path) -> None:
        data = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(data["data"]))


@contextlib.asynccontextmanager
async def chromium(profile_dir: Path) -> AsyncIterator[Page]:
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed (make install installs Debian's chromium)"
    proc = await asyncio.create_subprocess_exec(
        binary, *FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-port=0", "about:blank",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "chromium exited before its DevTools endpoint was up"
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match:
                break
        port = match.group(1).split(":")[2].split("/")[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        proc.kill()
        await proc.wait()
