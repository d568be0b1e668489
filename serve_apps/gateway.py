"""The gateway's request path: admit, route, relay. A plain ASGI app, free of Serve.

It parses only what routing needs (the model, the stream flag and, for strategies that ask,
the prompt text) and forwards the client's body bytes untouched, so engine-specific fields
(``ignore_eos``, ``continuous_usage_stats``, content parts, ...) reach vLLM as sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from kvcache.client import KVIndexClient
from kvcache.hashing import BlockHasher
from serve_apps.asgi import (
    ClientDisconnected,
    Headers,
    Receive,
    Scope,
    Send,
    read_body,
    request_headers,
    send_response,
)
from serve_apps.config import AppConfig
from serve_apps.errors import GatewayError, wrap_upstream_error
from serve_apps.metrics import GatewayMetrics
from serve_apps.routing import (
    STRATEGY_CLASSES,
    EndpointState,
    RequestHooks,
    RoutingRequest,
    RoutingStrategy,
    build_strategies,
    unknown_strategy_message,
)
from serve_apps.routing._prefix_common import INDEXED_MATCHES_KEY
from serve_apps.routing.base import PREFILL_ESTIMATE_KEY
from serve_apps.routing.prompt_blocks import block_hashes, prompt_token_ids
from serve_apps.upstream import (
    UpstreamBroken,
    UpstreamPool,
    UpstreamResponse,
    UpstreamUnavailable,
)
from serve_apps.usage import StreamUsage, Usage, usage_from_json
from serve_apps.users.api import ApiResponse, is_user_api_path
from serve_apps.users.limiter import Limiter, Ticket, token_estimate
from serve_apps.view import EndpointView

logger = logging.getLogger(__name__)

ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
WANTED_HEADERS = (b"routing-strategy", b"x-request-id", b"user", b"x-session-id", b"authorization")
MAX_ATTEMPTS = 2  # a connection failure before any byte is retried once, on another endpoint


@dataclass(slots=True)
class Relayed:
    """How one relayed response went: what the load signals and metrics need."""

    status: int
    first_byte: float  # perf_counter() when the first byte went to the client
    usage: Usage
    streamed: bool


class PrefillClaim:
    """A request's share of its endpoint's ``prefill_backlog``, given back exactly once: at
    the first streamed chunk (the prompt is computed), or when the request ends."""

    __slots__ = ("endpoint", "tokens")

    def __init__(self, endpoint: EndpointState, tokens: int) -> None:
        self.endpoint = endpoint
        self.tokens = tokens

    def release(self) -> None:
        if self.tokens:
            self.endpoint.on_first_token(self.tokens)
            self.tokens = 0


class StrategySet:
    """Every strategy, built with one set of options; ``hooks`` are those that learn from
    finished requests (vtc-basic's served tokens)."""

    def __init__(self, seed: int | None, options: dict[str, dict[str, Any]]) -> None:
        self.by_name: dict[str, RoutingStrategy] = build_strategies(seed, options)
        self.hooks: dict[str, RequestHooks] = {
            name: strategy for name, strategy in self.by_name.items() if isinstance(strategy, RequestHooks)
        }


class GatewayApp:
    """OpenAI-compatible front door: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

    def __init__(
        self,
        config: AppConfig,
        view: EndpointView,
        metrics: GatewayMetrics | None = None,
        kv_index: KVIndexClient | None = None,
        limiter: Limiter | None = None,
        user_api: Callable[[str, str, str, bytes], Awaitable[ApiResponse]] | None = None,
    ) -> None:
        self.config = config
        self.view = view
        self.metrics = metrics
        self.limiter = limiter
        self._user_api = user_api
        self._kv_index = kv_index
        self._events_models = {m.name for m in config.models if m.prefix_index == "events"}
        self._index_budget_s = config.gateway.kv_index.lookup_budget_s
        # One set of strategies per configured model (each with that model's options, e.g. its
        # engines' block hashing, and its own prefix index and counters), and one for names
        # the config does not list (adapters, engines registered from elsewhere).
        seed = config.gateway.seed
        self._strategy_sets = {m.name: StrategySet(seed, config.routing_options(m)) for m in config.models}
        self._default_set = StrategySet(seed, config.routing_options())
        self._strategy_names = {name: name.encode() for name in STRATEGY_CLASSES}
        self._model_strategy = {m.name: m.default_strategy for m in config.models if m.default_strategy}
        # Pools an autoscaler may scale to zero: a request finding no engine waits for one.
        self._scales_from_zero = {
            m.name for m in config.models if m.pool and m.autoscaling and m.autoscaling.scales_from_zero
        }
        self._pools: dict[str, UpstreamPool] = {}

    def _pool(self, url: str) -> UpstreamPool:
        pool = self._pools.get(url)
        if pool is None:
            host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
            pool = self._pools[url] = UpstreamPool(host, int(port), self.config.gateway.connect_timeout_s)
        return pool

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self.limiter is not None:
            await self.limiter.store.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ROUTED_PATHS:
            if method != "POST":
                await self._send_error(send, GatewayError(405, f"{method} is not allowed on {path}; use POST"), [])
                return
            await self._proxy(scope, receive, send)
        elif path == "/v1/models" and method == "GET":
            await send_response(send, 200, self._models_body(), [])
        elif is_user_api_path(path) and self._user_api is not None:
            await self._serve_user_api(scope, receive, send)
        elif path in ("/health", "/-/healthz"):
            await send_response(send, 200, b"ok", [], content_type=b"text/plain")
        else:
            await self._send_error(send, GatewayError(404, f"no route for {method} {path}", code="not_found"), [])

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _serve_user_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hand a user-API call to the user service; the gateway only carries bytes."""
        try:
            body = await read_body(receive)
        except ClientDisconnected:
            return
        authorization = request_headers(scope, (b"authorization",)).get("authorization", "")
        assert self._user_api is not None
        answer = await self._user_api(scope["method"], scope["path"], authorization, body)
        await send_response(send, answer.status, answer.body, answer.headers)

    def _models_body(self) -> bytes:
        created = int(time.time())
        models = sorted(set(self.view.models()) | self._scales_from_zero)  # at zero they still serve, after a wait
        cards = [{"id": m, "object": "model", "created": created, "owned_by": "rayfleet"} for m in models]
        return orjson.dumps({"object": "list", "data": cards})

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = request_headers(scope, WANTED_HEADERS)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        id_header = [(b"request-id", request_id.encode())]
        model = ""
        try:
            body = await read_body(receive)
            request, stream = self._parse(scope["path"], body, headers)
            model = request.model
            strategy_name = self._strategy_for(request)
            candidates = self._candidates(model)
            if self.view.is_adapter(model):
                request.lora_name = model
            ticket = await self._admit(request, headers, len(body))
            if not candidates:
                candidates = await self._activate(request, ticket, receive)
        except GatewayError as error:
            if self.metrics:
                self.metrics.record_error(model, error.code or str(error.status))
            await self._send_error(send, error, id_header)
            return
        except ClientDisconnected:
            return
        except Exception:  # a bug, not the caller's mistake: still an answer in OpenAI's shape
            logger.exception("request %s failed before routing", request_id)
            error = GatewayError(500, "the gateway failed on this request; its log has the details", code="internal_error")
            if self.metrics:
                self.metrics.record_error(model, "internal_error")
            await self._send_error(send, error, id_header)
            return
        route_headers = id_header + [(b"routing-strategy", self._strategy_names[strategy_name])]
        if ticket is not None:
            route_headers += ticket.headers
        strategies = self._strategy_sets.get(model, self._default_set)
        hooks = strategies.hooks.get(strategy_name)
        if hooks is not None:
            hooks.on_request_start(request)
        strategy = strategies.by_name[strategy_name]
        hasher = getattr(strategy, "hasher", None)
        if hasher is not None and self._kv_index is not None and model in self._events_models:
            await self._fetch_indexed_matches(request, hasher, candidates)
        usage = Usage()
        try:
            usage = await self._route_and_relay(
                request, strategy, strategy_name, candidates, body, stream, request_id,
                route_headers, started, receive, send,
            )  # fmt: skip
        finally:
            if hooks is not None:
                hooks.on_request_finish(request, usage.prompt_tokens, usage.output_tokens)
            if ticket is not None:
                await self._settle(ticket, request, usage)

    async def _admit(self, request: RoutingRequest, headers: dict[str, str], body_bytes: int) -> Ticket | None:
        """Identify the caller and take the request from their budget (raises 401/429/503)."""
        if self.limiter is None:
            return None
        identity = self.limiter.identify(headers)
        if identity is None:
            return None
        estimate = token_estimate(body_bytes, request.body, self.config.users.output_reservation_tokens)
        return await self.limiter.admit(identity, estimate)

    async def _settle(self, ticket: Ticket, request: RoutingRequest, usage: Usage) -> None:
        """Charge the response's tokens; a stream without a usage event has its prompt counted here."""
        assert self.limiter is not None
        if usage.output_tokens and not usage.prompt_tokens:
            usage = Usage(len(prompt_token_ids(request)), usage.output_tokens)
        await self.limiter.settle(ticket, usage)

    async def _route_and_relay(
        self,
        request: RoutingRequest,
        strategy: RoutingStrategy,
        strategy_name: str,
        candidates: list[EndpointState],
        body: bytes,
        stream: bool,
        request_id: str,
        route_headers: Headers,
        started: float,
        receive: Receive,
        send: Send,
    ) -> Usage:
        """Pick an endpoint and relay; on a refused connection, once more elsewhere."""
        path = request.path.encode()
        request_id_bytes = request_id.encode()
        tried: list[EndpointState] = []
        for attempt in range(MAX_ATTEMPTS):
            endpoint = strategy.choose(request, candidates)
            tried.append(endpoint)
            prefill = PrefillClaim(endpoint, request.derived.get(PREFILL_ESTIMATE_KEY, 0))
            endpoint.on_dispatch(time.monotonic(), prefill.tokens)
            relayed: Relayed | None = None
            try:
                relayed = await self._relay(
                    path, body, request_id_bytes, stream, endpoint,
                    route_headers + [(b"target-pod", endpoint.name.encode())], receive, send, prefill,
                )  # fmt: skip
            except UpstreamUnavailable as exc:
                # Nothing reached the client yet: try another endpoint once, then give up.
                logger.warning("endpoint %s unreachable for %s: %r", endpoint.name, request_id, exc)
                if self.metrics:
                    self.metrics.record_error(request.model, "upstream_unreachable")
                candidates = [c for c in candidates if c not in tried]
                if attempt + 1 < MAX_ATTEMPTS and candidates:
                    continue
                error = GatewayError(502, f"engine {endpoint.name} is unreachable: {exc!r}", code="upstream_unreachable")
                await self._send_error(send, error, route_headers)
                return Usage()
            finally:
                prefill.release()
                self._record_finish(endpoint, relayed, started)
            if self.metrics:
                now = time.perf_counter()
                self.metrics.record(
                    request.model, endpoint.name, strategy_name, relayed.status, relayed.first_byte - started, now - started
                )
            return relayed.usage
        raise AssertionError("unreachable: the last attempt returns")

    @staticmethod
    def _record_finish(endpoint: EndpointState, relayed: Relayed | None, started: float) -> None:
        """Feed the endpoint's load signals; a failed attempt counts as busy time without tokens."""
        elapsed = time.perf_counter() - started
        if relayed is None or relayed.status != 200:
            endpoint.on_finish(time.monotonic(), 0, 0, None, elapsed)
            return
        ttft = relayed.first_byte - started if relayed.streamed else None
        usage = relayed.usage
        endpoint.on_finish(time.monotonic(), usage.prompt_tokens, usage.output_tokens, ttft, elapsed)

    def _parse(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[RoutingRequest, bool]:
        """Read the model and the stream flag; everything else stays opaque bytes."""
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(parsed, dict):
            raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
        model = parsed.get("model")
        if model is None:
            raise GatewayError(400, "you must provide a model parameter", code="missing_model", param="model")
        if not isinstance(model, str):
            raise GatewayError(400, "model must be a string", code="invalid_type", param="model")
        stream = parsed.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise GatewayError(400, "stream must be a boolean", code="invalid_type", param="stream")
        return RoutingRequest(model=model, path=path, body=parsed, headers=headers), stream

    async def _fetch_indexed_matches(
        self, request: RoutingRequest, hasher: BlockHasher, candidates: list[EndpointState]
    ) -> None:
        """Ask the KV-event index which candidates hold the prompt's leading blocks, within
        the lookup budget; the strategy then reads the answer (``match_prompt``). On a miss
        it routes on its local approximate index, which every decision keeps feeding."""
        assert self._kv_index is not None
        hashes = block_hashes(request, hasher)
        if not hashes:
            return
        matches = await self._kv_index.lookup(hashes, [c.name for c in candidates], self._index_budget_s)
        if self.metrics:
            self.metrics.record_index_lookup(request.model, matches is not None)
        if matches is not None:
            request.derived[INDEXED_MATCHES_KEY] = (hasher.memo_key, matches)

    def _strategy_for(self, request: RoutingRequest) -> str:
        """The ``routing-strategy`` header, else the model's default, else the gateway's."""
        name = request.headers.get("routing-strategy") or self._model_strategy.get(request.model)
        name = name or self.config.gateway.default_strategy
        if name not in STRATEGY_CLASSES:
            raise GatewayError(400, unknown_strategy_message(name), code="invalid_routing_strategy")
        return name

    def _candidates(self, model: str) -> list[EndpointState]:
        """The model's ready endpoints; none only for a pool that scales from zero (then
        ``_activate`` waits for one). Raises 503 for a known model with none ready, 400 for
        an unknown one."""
        candidates = self.view.ready_endpoints(model)
        if candidates or model in self._scales_from_zero:
            return candidates
        if self.view.knows(model) or model in self._strategy_sets:  # configured, e.g. discovered pods not ready yet
            raise GatewayError(503, f"no ready endpoint serves model {model!r}; retry shortly", code="no_ready_endpoint")
        raise GatewayError(400, f"The model `{model}` does not exist.", code="model_not_found", param="model")

    async def _activate(self, request: RoutingRequest, ticket: Ticket | None, receive: Receive) -> list[EndpointState]:
        """Hold an admitted request until its pool, scaled to zero, has an engine ready.

        After admission, so that a caller the limiter refuses never wakes the pool. The
        gateway reports held requests (``queued``, and in ``in_flight``) to the autoscaler,
        which starts engines on them; past ``activation_timeout_s`` the caller gets 503 and
        its token reservation back. A caller that hangs up meanwhile is let go at once, its
        reservation returned: it no longer counts as demand for an engine.
        """
        timeout_s = self.config.gateway.activation_timeout_s
        waiting = asyncio.ensure_future(self.view.wait_ready(request.model, timeout_s))
        disconnected = asyncio.ensure_future(receive())  # resolves only with http.disconnect
        try:
            await asyncio.wait((waiting, disconnected), return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)  # no longer counted as held from here
        candidates = [] if waiting.cancelled() else waiting.result()
        if candidates:
            return candidates
        if ticket is not None:
            await self._settle(ticket, request, Usage())
        if disconnected.done() and not disconnected.cancelled():
            raise ClientDisconnected
        raise GatewayError(
            503, f"no engine for model {request.model!r} became ready within {timeout_s:g}s; retry shortly",
            code="no_ready_endpoint",
        )  # fmt: skip

    async def _relay(
        self,
        path: bytes,
        body: bytes,
        request_id: bytes,
        stream: bool,
        endpoint: EndpointState,
        response_headers: Headers,
        receive: Receive,
        send: Send,
        prefill: PrefillClaim,
    ) -> Relayed:
        """Forward one request and relay the answer.

        Raises ``UpstreamUnavailable`` only if nothing was sent to the client yet.
        """
        timeout_s = self.config.gateway.read_timeout_s
        pool = self._pool(endpoint.url)
        upstream, connection = await pool.post(path, body, request_id)
        try:
            await upstream.wait_headers(timeout_s)
            if upstream.status == 200 and stream and upstream.content_type.startswith(b"text/event-stream"):
                return await self._relay_stream(upstream, response_headers, receive, send, prefill)
            try:
                payload = await upstream.read(timeout_s)
            except UpstreamBroken as exc:
                raise UpstreamUnavailable(str(exc)) from None  # nothing sent to the client yet
            if upstream.status != 200:
                await send_response(send, upstream.status, wrap_upstream_error(upstream.status, payload), response_headers)
                return Relayed(upstream.status, time.perf_counter(), Usage(), streamed=False)
            await send_response(send, 200, payload, response_headers, content_type=upstream.content_type)
            return Relayed(200, time.perf_counter(), usage_from_json(payload), streamed=False)
        finally:
            pool.release(connection, upstream)

    async def _relay_stream(
        self, upstream: UpstreamResponse, response_headers: Headers, receive: Receive, send: Send, prefill: PrefillClaim
    ) -> Relayed:
        """Relay SSE chunks as they arrive; stop (closing the engine's stream) if the client leaves."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", upstream.content_type), (b"cache-control", b"no-cache"), *response_headers],
            }
        )
        first_byte = 0.0
        usage = StreamUsage()
        disconnected = asyncio.ensure_future(receive())  # resolves only with http.disconnect
        try:
            async for chunk in upstream.chunks(self.config.gateway.read_timeout_s):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if not first_byte:
                    first_byte = time.perf_counter()
                    prefill.release()
                usage.feed(chunk)
                if disconnected.done():
                    # Returning before the body completes makes release() close the
                    # connection, which is how the engine learns to abort the request.
                    logger.info("client went away mid-stream; closing the engine's stream")
                    return Relayed(200, first_byte, usage.result(), streamed=True)
        except UpstreamBroken as exc:
            # Headers are out: the client sees the stream end early, which is all we can say.
            logger.warning("engine stream broke after the first byte: %s", exc)
        finally:
            disconnected.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return Relayed(200, first_byte or time.perf_counter(), usage.result(), streamed=True)

    @staticmethod
    async def _send_error(send: Send, error: GatewayError, headers: Headers) -> None:
        await send_response(send, error.status, error.body(), headers + error.headers)
