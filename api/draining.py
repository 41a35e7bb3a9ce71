"""Held status requests answer as soon as the process is told to stop.

uvicorn stops on SIGTERM or SIGINT by closing its listening socket, then waiting up to its
graceful timeout for the requests in progress, then cancelling them. A long-poll may be held for
30 s and an event stream for minutes, so they would be cut at the timeout: the client's
connection dropped, an error logged for each of thousands, and the stop delayed by the whole
timeout. Instead, the signal first releases them: each long-poll answers with the status as it
stands and each stream ends, so their clients ask again at once (another replica, behind a load
balancer), and the server's own handler then stops it as ever.
"""

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, FrameType | None], object]


@contextlib.contextmanager
def release_on_stop(release: Callable[[], None]) -> Iterator[None]:
    """Run `release` on the event loop when a stop signal arrives, then the handler the server
    installed. Only where a server installed handlers of its own (uvicorn does, before the
    app's lifespan starts): an app driven by a test client leaves the process's signals be."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    servers: dict[int, Handler] = {}
    for sig, handler in previous.items():
        if callable(handler) and handler is not signal.default_int_handler:
            servers[sig] = handler
    if threading.current_thread() is not threading.main_thread() or len(servers) != len(
        STOP_SIGNALS
    ):
        yield
        return
    loop = asyncio.get_running_loop()

    def stop(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(release)
        servers[sig](sig, frame)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is stop:
                signal.signal(sig, handler)
