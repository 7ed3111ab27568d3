"""The HTTP process's view of the inference workers, kept by one thread: whether the model is loaded,
whether an engine has failed, the workers' counters, and the cancellations to hand them.

LitServe's setup states and ptserve's shared dicts (`ptserve.worker.Shared`) are multiprocessing-manager
dicts: every read or write is a round trip to the manager process. Made on the event loop, each would
stall every stream in the process, so they happen here and the handlers read plain attributes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how fresh the view is (workers publish every 50 ms)
PARENT_POLL_S = 1.0  # how often a process checks that the server's main process still exists


def dead_engines(stats: dict[str, dict]) -> list[str]:
    """ "worker: why" for each worker whose engine has stopped for good, from the workers' published counters."""
    return [f"{name}: {s['dead']}" for name, s in sorted(stats.items()) if s.get("dead")]


class WorkerLink:
    LOADING, READY, FAILED = "loading", "ready", "failed"

    def __init__(self, setup_status: Any = None, shared: Any = None, ready: Any = "ready", error: Any = "error"):
        self.setup_status = setup_status  # LitServe's worker name -> its setup status
        self.shared = shared  # ptserve.worker.Shared
        self._ready_value, self._error_value = ready, error  # LitServe's WorkerSetupStatus.READY / .ERROR
        self.state = self.LOADING if setup_status is not None else self.READY
        self.any_ready = setup_status is None  # a worker can take requests
        self.failure: str | None = None  # why an engine stopped for good
        self.stats: dict[str, dict] = {}  # worker name -> its counters, as last read
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread (in the process that serves HTTP: LitServe forks it, and threads do not
        survive a fork, so this is called from the handlers, not at build time). Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None:
                exit_with_parent()  # first call in this (forked) process
                # the workers' state before the request that started the link is answered: the thread looks
                # later (a first request right after start-up was refused as "still loading")
                try:
                    self.refresh()
                except Exception:
                    logger.exception("reading the workers' state failed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ptserve-worker-link", daemon=True)
                self._thread.start()

    def cancel(self, uid: str) -> None:
        """Ask whichever worker holds `uid` to drop it (sent from the thread)."""
        self.start()
        self._outbox.put((uid, time.time()))

    # -- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_refresh = 0.0
        while True:
            try:
                item = self._outbox.get(timeout=max(next_refresh - time.monotonic(), 0.0))
                if self.shared is not None:
                    self.shared.cancelled[item[0]] = item[1]
                continue
            except queue.Empty:
                pass
            except (OSError, EOFError, BrokenPipeError):  # the manager is gone: the server is stopping
                return
            try:
                self.refresh()
            except (OSError, EOFError, BrokenPipeError):
                return
            except Exception:
                logger.exception("reading the workers' state failed")
            next_refresh = time.monotonic() + POLL_S

    def refresh(self) -> None:
        states = list(self.setup_status.values()) if self.setup_status is not None else []
        stats = dict(self.shared.stats) if self.shared is not None else {}
        self.stats = stats
        dead = dead_engines(stats)
        if dead or self._error_value in states:
            if self.state != self.FAILED:
                logger.critical("inference worker failed: %s", "; ".join(dead) or "setup error")
            self.failure = "; ".join(dead) or "an inference worker failed to load the model"
            self.state = self.FAILED
            return
        if self.setup_status is None:
            return
        self.any_ready = any(v == self._ready_value for v in states)
        self.state = self.READY if states and all(v == self._ready_value for v in states) else self.LOADING


def exit_with_parent() -> None:
    """End this process (an inference worker, or the HTTP server LitServe forks) when the server's main
    process is gone (killed -9, out-of-memory killed): an orphaned worker would keep the model and the
    GPU's memory forever, and an orphaned HTTP process would answer /health 200 for a server that is dead."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        logger.critical("the server's main process %d is gone; process %d exits", parent, os.getpid())
        os._exit(1)

    threading.Thread(target=watch, name="ptserve-parent-watch", daemon=True).start()
