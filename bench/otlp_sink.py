"""An OTLP/HTTP trace collector for `python -m bench.run --traces`: it takes every export, decodes it (as a
collector would) and counts spans; `GET /count` answers how many. Its own process, so its work is not the
bench client's nor Pier's.

    python -m bench.otlp_sink PORT
"""

from __future__ import annotations

import sys

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SPANS = web.AppKey("spans", list)
_REPLY = ExportTraceServiceResponse().SerializeToString()


async def export(request: web.Request) -> web.Response:
    message = ExportTraceServiceRequest()
    message.ParseFromString(await request.read())
    request.app[SPANS][0] += sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
    return web.Response(body=_REPLY, content_type="application/x-protobuf")


async def count(request: web.Request) -> web.Response:
    return web.json_response({"spans": request.app[SPANS][0]})


def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SPANS] = [0]
    app.router.add_post("/v1/traces", export)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
