"""uvicorn with a graceful SIGTERM: drain in-flight requests, refuse new ones with 503, then exit 0.

uvicorn's own SIGTERM stops listening at once (a new client gets "connection refused", not an answer)
and, after shutting down, raises the signal again, so the process dies of SIGTERM rather than exiting
0. Here the first SIGTERM (or Ctrl+C) only starts draining: the listener stays open and the app answers
new API requests with 503 ``shutting_down`` (``/ready`` too, so a load balancer moves away) while the
requests in flight finish; when none is left, or after ``drain_timeout`` seconds, uvicorn shuts down as
usual. A second signal stops at once.
"""

from __future__ import annotations

import os
import signal
import time

import uvicorn

from .app import ServerState, log_event

# Exit status when the model fails to load after the server started listening.
EXIT_LOAD_FAILED = 1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._drain_deadline: float | None = None
        state.on_fatal = self._fatal

    def _fatal(self) -> None:
        self.exit_code = EXIT_LOAD_FAILED
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in uvicorn's captured signals: it would re-raise SIGTERM after a clean shutdown.
        if self.state.draining:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.state.settings.drain_timeout
        log_event("draining", signal=signal.Signals(sig).name, in_flight=self.state.in_flight)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            if self.state.in_flight == 0 or time.monotonic() > self._drain_deadline:
                log_event("stopping", in_flight=self.state.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log_event("listening", host=host, port=port, pid=os.getpid())
