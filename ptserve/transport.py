"""The inference workers' messages to the HTTP process: ZeroMQ PUSH/PULL sockets over IPC.

LitServe's default transport is a multiprocessing-manager queue: every message a worker sends is a round
trip to the manager process, made on the worker's event loop while the engine thread waits for the GIL
(`cheap` bench model: ~0.25 ms of each token's ~3.1 ms at one stream; at 16 and 64 streams the path
itself was the limit, 1,062 and 1,562 tok/s against 1,879 and 2,758 without it). Its `fast_queue=True`
(ZeroMQ) is silently ignored in LitServe 0.2.19 (Lightning-AI/LitServe#751: the config keyword is
misspelt) and, were it on, is PUB/SUB: miswired there, and a subscriber that falls behind loses messages.

Here each consumer (HTTP server process) binds one PULL socket; each worker connects a PUSH socket to
it. A send is queued to ZeroMQ's I/O thread and returns; nothing is dropped (no high-water mark: a
backlog waits in memory, as it did in the manager's queue) and one worker's messages arrive in order.
Messages sent from a worker's event loop in one turn of it travel together: one pickle and one ZeroMQ
message for all of them (a decoding pass hands every stream its token in the same turn, so at 64 streams
one message a pass instead of 64, and the HTTP process wakes once for them); sent from another thread, a
message goes at once, after what its consumer's batch holds.
The object crosses process boundaries by its addresses only (`__reduce__`); sockets are opened where used.

The sockets are files in a directory only the server's user can enter (mkdtemp, 0700): what arrives is
unpickled, so no other local user may connect (the manager's queue had its authkey; a socket in Linux's
abstract namespace would have no permissions at all). The server's main process removes it when it exits;
one killed before it could (SIGKILL, a crash) leaves it behind, and the next server removes those that no
running server holds (each holds a lock on a file in its folder).
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections import deque
from queue import Empty
from typing import Any

import zmq
import zmq.asyncio
from litserve.transport.base import MessageTransport

logger = logging.getLogger(__name__)


PREFIX = "ptserve-"  # the socket folders' names: this, then mkdtemp's random part
LOCK = "lock"  # a file in each folder, flock'ed by the server that made it for as long as it (or a fork) runs
STALE_AFTER_S = 60  # an unlocked folder younger than this may be one a server is making right now
_held: list[int] = []  # the lock files of the folders this process made


def _remove_stale_folders() -> None:
    """Remove this user's socket folders that no running server holds (a server killed before its atexit
    ran). Held or not is the folder's lock, not a pid: servers in other containers sharing /tmp have pids
    this one cannot see, and their locks still show. Folders without a lock file are left alone."""
    root = tempfile.gettempdir()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if info.st_uid != os.getuid() or time.time() - info.st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(os.path.join(entry.path, LOCK), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: no server holds it any more
        except OSError:
            continue  # a running server's
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def _picklable(item: Any) -> bool:
    try:
        pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        logger.exception("dropped a message that does not pickle: %r", item)
        return False
    return True


class PushPullTransport(MessageTransport):
    def __init__(self, addresses: list[str]):
        self.addresses = addresses  # one ipc:// address per consumer
        self._context: zmq.Context | None = None  # this process's, made at its first send
        self._pushers: dict[int, zmq.Socket] = {}
        self._puller: zmq.asyncio.Socket | None = None
        self._lock = threading.Lock()  # a ZeroMQ socket is not thread-safe
        self._closed = False
        self._batches: dict[int, list] = {}  # per consumer: messages of this turn of the event loop, not yet sent
        self._received: deque = deque()  # messages of a batch not yet returned by `areceive`

    @classmethod
    def create(cls, consumers: int) -> PushPullTransport:
        """Addresses in a new folder, removed when this process exits: not at `close()`, which LitServe calls
        before the HTTP processes have drained their streams (a worker's first connection would then find
        no socket)."""
        _remove_stale_folders()
        folder = tempfile.mkdtemp(prefix=PREFIX)  # mode 0700
        lock = os.open(os.path.join(folder, LOCK), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # shared with the HTTP processes forked from this one
        _held.append(lock)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return cls([f"ipc://{folder}/{i}.ipc" for i in range(consumers)])

    @property
    def folder(self) -> str:
        return os.path.dirname(self.addresses[0].removeprefix("ipc://"))

    def __reduce__(self):
        return PushPullTransport, (self.addresses,)

    # -- workers ------------------------------------------------------------------------------------
    def send(self, item: Any, consumer_id: int) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            batch = self._batches.setdefault(consumer_id, [])
            batch.append(item)
            if loop is None:  # not from an event loop: now
                self._send_batch(consumer_id)
            elif len(batch) == 1:  # the first of this turn: sent with the others at the loop's next turn
                loop.call_soon(self._flush, consumer_id)

    def _flush(self, consumer_id: int) -> None:
        with self._lock:
            self._send_batch(consumer_id)

    def _send_batch(self, consumer_id: int) -> None:
        batch = self._batches.pop(consumer_id, None)
        if not batch:
            return
        try:
            data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # one item that does not pickle: the others go, it is dropped (as a lone send raised)
            batch = [item for item in batch if _picklable(item)]
            if not batch:
                return
            data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        socket = self._pushers.get(consumer_id)
        if socket is None:
            if self._context is None:
                self._context = zmq.Context()
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, 0)  # never drop nor block: queue
            socket.setsockopt(zmq.LINGER, 1000)  # at close, a second to deliver what is queued
            socket.connect(self.addresses[consumer_id])
            self._pushers[consumer_id] = socket
        socket.send(data, copy=len(data) < 65536)

    # -- the HTTP process ---------------------------------------------------------------------------
    async def areceive(self, consumer_id: int, timeout: float | None = None, block: bool = True) -> Any:
        if self._received:
            return self._received.popleft()
        if self._closed:
            raise asyncio.CancelledError("transport closed")
        if self._puller is None:
            address = self.addresses[consumer_id]
            self._puller = zmq.asyncio.Context.instance().socket(zmq.PULL)
            self._puller.setsockopt(zmq.RCVHWM, 0)
            self._puller.setsockopt(zmq.LINGER, 0)
            self._puller.bind(address)
        try:
            data = await asyncio.wait_for(self._puller.recv(), timeout) if timeout else await self._puller.recv()
        except asyncio.TimeoutError:
            raise Empty from None
        try:
            first, *rest = pickle.loads(data)
        except Exception:  # LitServe's reader stops for good on an exception; it skips None
            logger.exception("dropped an unreadable message of %d bytes", len(data))
            return None
        self._received.extend(rest)
        return first

    def close(self, send_sentinel: bool = False) -> None:
        """Close this process's sockets; a sender's close returns once what it queued is delivered (or after
        a second: a process ends with os._exit, which would drop it)."""
        with self._lock:
            for consumer_id in list(self._batches):
                self._send_batch(consumer_id)
            self._closed = True
            for socket in self._pushers.values():
                socket.close()
            self._pushers.clear()
            if self._context is not None:
                self._context.term()
                self._context = None
        if self._puller is not None:
            self._puller.close(linger=0)
            self._puller = None
