"""The daemon's HTTP API: a starlette app served by hypercorn's trio worker.

Routes: GET /v1/health, GET /v1/status, GET /v1/swarm, POST /v1/ping, the DHT's
GET /v1/dht/servers?model=M&blocks=N, GET /v1/dht/blob/<sha256>, POST /v1/dht/announce,
and the OpenAI-compatible routes (``openai_api.py``, passed in as ``extra_routes``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from shoal import __version__
from shoal.dht.records import is_sha256_hex
from shoal.errors import Error
from shoal.node.config import parse_bind
from shoal.transport.ping import MAX_PING_BYTES

if TYPE_CHECKING:
    # trio-typing's stale stubs (pulled in by libp2p) shadow trio's own types.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

#: Most blocks a DHT coverage query may ask about (one lookup each).
MAX_BLOCKS = 1024


class NodeView(Protocol):
    """What the API needs from the running node."""

    def status(self) -> dict[str, Any]: ...

    def swarm(self) -> dict[str, Any]: ...

    async def ping(
        self, peer: str, size: int, seed: int, *, bulk: bool = False
    ) -> dict[str, Any]: ...

    async def dht_servers(self, model_id: str, num_blocks: int) -> dict[str, Any]: ...

    async def dht_blob(self, sha256: str) -> dict[str, Any]: ...

    def dht_announce(self, body: dict[str, Any]) -> dict[str, Any]: ...


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def build_api(node: NodeView, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The node's routes plus ``extra_routes`` (the OpenAI-compatible ones)."""

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "version": __version__})

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(node.status())

    async def swarm(request: Request) -> JSONResponse:
        return JSONResponse(node.swarm())

    async def ping(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return error(400, "bad_json", f"request body is not JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("peer"), str):
            return error(400, "bad_request", 'expected {"peer": "<peer id>", "bytes": N}')
        size, seed = body.get("bytes", 1024), body.get("seed", random.getrandbits(32))
        if not isinstance(size, int) or not 0 <= size <= MAX_PING_BYTES:
            return error(400, "bad_request", f"bytes must be an integer in [0, {MAX_PING_BYTES}]")
        if not isinstance(seed, int):
            return error(400, "bad_request", "seed must be an integer")
        bulk = body.get("bulk", False)
        if not isinstance(bulk, bool):
            return error(400, "bad_request", "bulk must be true or false")
        try:
            return JSONResponse(await node.ping(body["peer"], size, seed, bulk=bulk))
        except Error as exc:
            return error(502, "peer_failed", str(exc))

    async def dht_servers(request: Request) -> JSONResponse:
        model = request.query_params.get("model", "")
        blocks = request.query_params.get("blocks", "")
        if not model or not blocks.isdigit() or not 1 <= int(blocks) <= MAX_BLOCKS:
            return error(400, "bad_request", f"expected ?model=M&blocks=N, 1 <= N <= {MAX_BLOCKS}")
        return JSONResponse(await node.dht_servers(model, int(blocks)))

    async def dht_blob(request: Request) -> JSONResponse:
        sha256 = request.path_params["sha256"]
        if not is_sha256_hex(sha256):
            return error(400, "bad_request", "expected a lowercase hex sha256")
        return JSONResponse(await node.dht_blob(sha256))

    async def dht_announce(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return error(400, "bad_json", f"request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return error(400, "bad_request", "expected a JSON object")
        try:
            return JSONResponse(node.dht_announce(body))
        except Error as exc:
            return error(400, "bad_request", str(exc))

    return Starlette(
        routes=[
            Route("/v1/dht/servers", dht_servers),
            Route("/v1/dht/blob/{sha256}", dht_blob),
            Route("/v1/dht/announce", dht_announce, methods=["POST"]),
            Route("/v1/health", health),
            Route("/v1/status", status),
            Route("/v1/swarm", swarm),
            Route("/v1/ping", ping, methods=["POST"]),
            *extra_routes,
        ]
    )


async def serve_api(
    app: Starlette,
    bind: str,
    *,
    task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``bind`` (HOST:PORT); reports the base URL once listening."""
    host, port = parse_bind(bind)
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("shoal.node.http")
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        bound: list[str] = await nursery.start(_serve, app, config)
        url = bound[0] if bound else f"http://{host}:{port}"
        log.info("HTTP API on %s", url)
        task_status.started(url)


async def _serve(
    app: Starlette, config: HypercornConfig, *, task_status: TaskStatus[list[str]]
) -> None:
    await serve(app, config, task_status=task_status)
