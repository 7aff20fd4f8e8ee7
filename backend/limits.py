"""Admission control: how many requests the web process works on at once.

Why: a request holds a database connection across several thread-pool hops (authentication,
the endpoint, the commit). With more requests in flight than pooled connections, threads that
wait for a connection occupy the pool's threads while requests holding connections wait for a
thread: everyone waits until the pool timeout, and the server answers 500s. Letting at most
``web_concurrency`` requests in, with at least that many connections and threads, makes that
impossible; the others wait in the event loop, where waiting costs nothing but memory.

Operational endpoints (``/healthz``, ``/metrics``) and static files bypass the line so that
monitoring still answers under load; the pool keeps a few spare connections for them.
"""

from __future__ import annotations

import asyncio
import gc

import anyio.to_thread
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths that never wait in line (cheap, and needed to see an overloaded server).
BYPASS_PREFIXES = ("/healthz", "/metrics", "/static/")
#: Threads and connections beyond ``web_concurrency`` for the paths that bypass the line.
SPARE = 8


def thread_limit(concurrency: int) -> int:
    """Worker threads the web process needs for ``concurrency`` admitted requests."""
    return concurrency + SPARE


def configure_threads(concurrency: int) -> None:
    """Size the thread pool that runs sync endpoints and dependencies (call inside the event loop)."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = thread_limit(concurrency)


def freeze_startup_heap() -> int:
    """Exclude every object alive now (modules, routes, schemas, compiled queries) from the cyclic
    garbage collector's future full collections; returns how many objects were frozen.

    A started web process holds about 140,000 tracked objects that live as long as it does. A full
    (oldest-generation) collection walks all of them, which takes tens of milliseconds on a busy
    core (measured: about 750 ms on the loaded 2-core machine), and the interpreter holds every
    request while it runs (docs/benchmarks.md, section 5). Call once, after start-up work is done;
    garbage made before the call is collected first.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class ConcurrencyLimitMiddleware:
    """Admit at most ``limit`` HTTP requests at a time; the slot is freed when the response starts.

    Database sessions of request handlers are closed before the response starts (dependencies
    with ``scope="function"``), so a long streamed body (a live progress view) does not hold a
    slot.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._semaphore: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(BYPASS_PREFIXES):
            await self.app(scope, receive, send)
            return
        if self._semaphore is None:  # created in the server's event loop
            self._semaphore = asyncio.Semaphore(self.limit)
        semaphore = self._semaphore
        await semaphore.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                semaphore.release()

        async def send_and_release(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()
