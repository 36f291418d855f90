"""`moe-edge serve`: an OpenAI-compatible HTTP server over one loaded model.

Starlette routes on uvicorn's event loop; the model runs on one worker thread (Engine), one
generation at a time, with a bounded queue of waiting requests (429 beyond it). The loop only
awaits: prompts are tokenized on a helper thread, pieces of text come back from the worker
through an asyncio queue. Every generation goes through generation.TextStream with the
engine's one PrefixCache, the path `moe-edge chat` takes, so a request sharing a prefix with
the previous one (a conversation's next turn, a fixed system prompt) prefills only the rest.

>>> app = create_app(lm, "demo", context=4096, api_key="secret")
>>> serve(app, listen("127.0.0.1", 8080))
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from . import openai_format as fmt
from .errors import ConfigError
from .generation import GenerationResult, PrefixCache, TextStream
from .openai_format import ApiError

log = logging.getLogger(__name__)
MAX_BODY = 4 * 2**20  # bytes of a request body; a 4,096-token conversation is ~20 KB
SHUTTING_DOWN = ApiError(503, "the server is shutting down; the generation was stopped",
                         code="shutting_down", type="server_error")


class Job:
    """One accepted request: the worker thread's events for the event loop, and the flag
    that stops its generation at the next token (a client gone, the server stopping)."""

    def __init__(self, request: fmt.Request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()  # ("piece", str), then ("done", result|error)
        self.cancel = threading.Event()

    def emit(self, kind: str, value) -> None:
        """From the worker thread: in order, as the loop's queue is only fed through here."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    async def result(self) -> GenerationResult:
        """The finished generation (for a request without `stream`)."""
        while True:
            kind, value = await self.events.get()
            if kind == "done":
                return _finished(value)


def _finished(value) -> GenerationResult:
    if isinstance(value, ApiError):
        raise value
    if value is None or value.finish_reason == "interrupted":
        raise SHUTTING_DOWN  # a client that left is not told; only a stopping server cuts short
    return value


class Engine:
    """The model on one worker thread, one generation at a time; at most `queue_size`
    accepted requests wait. Everything but `_run` runs on the event loop."""

    def __init__(self, lm, context: int, queue_size: int):
        self.lm, self.context, self.queue_size = lm, context, queue_size
        self.cache = PrefixCache(lm.model, context)
        self.jobs: set[Job] = set()  # accepted and not finished: running first, then waiting
        self.counts = dict.fromkeys(["completed", "cancelled", "failed", "rejected", "prompt_tokens",
                                     "cached_tokens", "generated_tokens"], 0)
        self.last: dict | None = None
        self.stopping = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="moe-edge-model")

    def submit(self, request: fmt.Request) -> Job:
        if self.stopping:
            raise SHUTTING_DOWN
        if len(self.jobs) > self.queue_size:
            self.counts["rejected"] += 1
            raise ApiError(429, f"the server is busy: one request is generating and {self.queue_size} "
                           "are waiting, as many as it queues (--queue-size); retry later",
                           code="queue_full", type="rate_limit_error")
        job = Job(request, asyncio.get_running_loop())
        self.jobs.add(job)
        self._worker.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        """On the worker thread: the generation, its pieces sent as they come."""
        value = None
        try:
            if not job.cancel.is_set():  # a request whose client left while it waited is skipped
                r = job.request
                stream = TextStream(self.lm.model, self.lm.tokenizer, r.prompt_ids, r.params,
                                    self.context, self.cache, job.cancel)
                for piece in stream:
                    job.emit("piece", piece)
                value = stream.result
        except Exception as e:  # a bug or an OS error: this request fails, the server goes on
            self.cache.clear()
            log.warning("a generation failed: %s: %s", type(e).__name__, e)
            value = ApiError(500, f"the generation failed ({type(e).__name__}: {e})",
                             code="generation_failed", type="server_error")
        finally:
            job.loop.call_soon_threadsafe(self._done, job, value)

    def _done(self, job: Job, value) -> None:
        self.jobs.discard(job)
        if isinstance(value, GenerationResult):
            key = "cancelled" if value.finish_reason == "interrupted" else "completed"
            self.counts[key] += 1
            self.counts["prompt_tokens"] += value.prompt_tokens
            self.counts["cached_tokens"] += value.cached_tokens
            self.counts["generated_tokens"] += value.generated_tokens
            self.last = {k: getattr(value, k) for k in ("finish_reason", "prompt_tokens", "cached_tokens",
                                                        "generated_tokens", "prompt_seconds", "decode_seconds")}
        else:
            self.counts["cancelled" if value is None else "failed"] += 1
        job.events.put_nowait(("done", value))

    def stop(self) -> None:
        """Refuse new requests and stop every accepted one at its next token."""
        self.stopping = True
        for job in self.jobs:
            job.cancel.set()

    def close(self) -> None:
        self.stop()
        self._worker.shutdown(wait=True, cancel_futures=True)

    def metrics(self) -> dict:
        kv = self.cache.kv
        return {"requests": {"running": min(1, len(self.jobs)), "waiting": max(0, len(self.jobs) - 1),
                             "queue_size": self.queue_size, **self.counts},
                "last_request": self.last,
                "kv_cache": {"tokens": len(self.cache.ids), "capacity": kv.capacity if kv else 0,
                             "bytes": kv.nbytes() if kv else 0, "context": self.context},
                "offload": offload_metrics(self.lm)}


def offload_metrics(lm) -> dict | None:
    """The expert cache's counters since load (None when every expert is resident)."""
    stats = lm.offload_stats()
    if stats is None:
        return None
    t = stats.total
    return {"hit_rate": t.hit_rate, "hits": t.hits, "misses": t.misses, "bytes_paged": t.bytes_moved,
            "stall_seconds": t.stall_seconds, "prefetch_issued": t.prefetch_issued,
            "prefetch_used": t.prefetch_used, "prefetch_wasted": t.prefetch_wasted,
            "slots_per_layer": lm.offload.cache.slots_per_layer}  # fewer than planned once the KV cache took some


# --- HTTP ------------------------------------------------------------------------------------

class Api:
    """The routes' handlers over one Engine."""

    def __init__(self, engine: Engine, model_id: str, max_body: int):
        self.engine, self.model_id, self.max_body = engine, model_id, max_body

    async def chat(self, request: HttpRequest):
        return await self._complete(request, chat=True)

    async def completions(self, request: HttpRequest):
        return await self._complete(request, chat=False)

    async def _complete(self, request: HttpRequest, chat: bool):
        body = fmt.parse_json(await read_body(request, self.max_body))
        lm = self.engine.lm
        req = await run_in_threadpool(fmt.read_request, body, chat, lm.tokenizer, lm.defaults,
                                      self.engine.context)  # tokenizing: off the loop too
        job = self.engine.submit(req)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        if req.stream:
            return StreamingResponse(self._events(job, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result = await job.result()
        finally:
            watcher.cancel()
        return JSONResponse(fmt.completion(req, self.model_id, result))

    async def _events(self, job: Job, watcher: asyncio.Task):
        req, model = job.request, self.model_id
        try:
            if req.chat:
                yield fmt.sse(fmt.chunk(req, model, first=True))
            while (event := await job.events.get())[0] == "piece":
                yield fmt.sse(fmt.chunk(req, model, text=event[1]))
            try:
                result = _finished(event[1])
            except ApiError as e:
                yield fmt.sse(e.body())
            else:
                yield fmt.sse(fmt.chunk(req, model, result=result))
                if req.include_usage:
                    yield fmt.sse(fmt.usage_chunk(req, model, result))
            yield fmt.sse("[DONE]")
        finally:  # also when the client left: the generation stops at its next token
            job.cancel.set()
            watcher.cancel()

    async def models(self, request: HttpRequest):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": 0, "owned_by": "moe-edge"}]})

    async def health(self, request: HttpRequest):
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: HttpRequest):
        return JSONResponse({"model": self.model_id, **self.engine.metrics()})


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes."""
    too_large = ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _cancel_on_disconnect(request: HttpRequest, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()


class BearerAuth:
    """ASGI middleware: every route but /health needs `Authorization: Bearer KEY`,
    compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health" and not self._allowed(scope):
            error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
            response = JSONResponse(error.body(), 401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


async def _api_error(request, e: ApiError):
    return JSONResponse(e.body(), e.status)


async def _http_error(request, e: HTTPException):
    what = {404: f"no route {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions",
            405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, e.detail)
    return JSONResponse(ApiError(e.status_code, what, code="not_found" if e.status_code == 404
                                 else "method_not_allowed").body(), e.status_code)


async def _server_error(request, e: Exception):
    error = ApiError(500, f"internal error ({type(e).__name__})", code="internal_error", type="server_error")
    return JSONResponse(error.body(), 500)


def create_app(lm, model_id: str, context: int, queue_size: int = 8, api_key: str | None = None,
               max_body: int = MAX_BODY) -> Starlette:
    """The ASGI app over a loaded model (`load_auto` and friends); `app.state.engine` runs it."""
    if queue_size < 0:
        raise ConfigError(f"queue_size must be >= 0, not {queue_size}")
    engine = Engine(lm, context, queue_size)
    api = Api(engine, model_id, max_body)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.close)

    routes = [Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/models", api.models), Route("/health", api.health), Route("/metrics", api.metrics)]
    app = Starlette(routes=routes, middleware=[Middleware(BearerAuth, key=api_key)] if api_key else [],
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                        Exception: _server_error}, lifespan=lifespan)
    app.state.engine = engine
    return app


# --- running ---------------------------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), bound before the server starts so that a
    port in use is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                          "or --host") from None


class Server(uvicorn.Server):
    """uvicorn's server, whose first SIGINT or SIGTERM also stops the running generation at
    its next token and then returns normally (uvicorn would re-raise the signal); a second
    SIGINT forces the exit."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.stop()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def server(app: Starlette, verbose: bool = False) -> Server:
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=5, lifespan="on")
    return Server(config, app.state.engine)


def serve(app: Starlette, sock: socket.socket, verbose: bool = False) -> None:
    """Serve until SIGINT or SIGTERM (from the main thread), then shut down cleanly."""
    server(app, verbose).run(sockets=[sock])


class ServerThread:
    """`app` served from a daemon thread on `host`, a free port by default (tests, benchmarks,
    a notebook): no signal handling; `stop()` shuts it down as SIGTERM would.

    >>> running = ServerThread(create_app(lm, "demo", 4096))
    >>> running.url   # http://127.0.0.1:PORT
    >>> running.stop()
    """

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        sock = listen(host, port)
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self.server = server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.02)

    def stop(self, timeout: float = 30) -> None:
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout)
