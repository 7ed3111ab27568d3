"""The workers' messages to the HTTP process (ptserve/transport.py): nothing lost, each worker's in order,
whatever the timing; the server uses this transport, not LitServe's manager queues."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import stat
import tempfile
import time
from queue import Empty

import pytest
import zmq

from ptserve.transport import PushPullTransport

LARGE = 100_000  # bytes: sent without a copy (the path for messages over 64 KiB)


def produce(transport: PushPullTransport, worker: int, count: int) -> None:
    """A worker process: `count` messages to consumer 0, every 100th a large one."""
    for i in range(count):
        payload = b"x" * LARGE if i % 100 == 0 else b""
        transport.send((f"w{worker}", (i, payload)), consumer_id=0)
    transport.close()


def receive(transport: PushPullTransport, count: int, start_producers) -> list:
    async def main():
        # the producers start (and send) before the consumer has bound its socket
        procs = start_producers()
        await asyncio.sleep(0.5)
        got = [await transport.areceive(0, timeout=10) for _ in range(count)]  # Empty if one is lost
        with pytest.raises(Empty):  # and nothing more
            await transport.areceive(0, timeout=0.2)
        return got, procs

    got, procs = asyncio.run(main())
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    return got


def test_every_message_arrives_in_order_even_sent_before_the_consumer_binds():
    transport = PushPullTransport.create(1)
    ctx = multiprocessing.get_context("spawn")  # as LitServe starts its workers
    count = 5000

    def start():
        procs = [ctx.Process(target=produce, args=(transport, w, count)) for w in (0, 1)]
        for p in procs:
            p.start()
        return procs

    try:
        got = receive(transport, 2 * count, start)
    finally:
        transport.close()
    for worker in ("w0", "w1"):
        mine = [body for who, body in got if who == worker]
        assert [i for i, _ in mine] == list(range(count))  # all of them, in the order sent
        assert all(len(payload) == (LARGE if i % 100 == 0 else 0) for i, payload in mine)


def test_messages_of_one_turn_of_an_event_loop_travel_together():
    """A worker's messages sent from its event loop in one turn go as one ZeroMQ message (a pass hands every
    stream its token in one turn); one sent from another thread goes at once, after what the turn holds so
    far: order kept; the HTTP side returns them one by one."""
    import threading

    transport = PushPullTransport.create(1)
    raw = zmq.Context.instance().socket(zmq.PULL)
    raw.bind(transport.addresses[0])
    worker = pickle.loads(pickle.dumps(transport))

    async def turns():
        for i in range(100):
            worker.send(("a", i), consumer_id=0)
        await asyncio.sleep(0)  # the loop's next turn: they go
        worker.send(("b", 0), consumer_id=0)
        other = threading.Thread(target=worker.send, args=(("thread", 0),), kwargs={"consumer_id": 0})
        other.start()
        other.join()
        worker.send(("b", 1), consumer_id=0)
        worker.send(("b", 2), consumer_id=0)
        await asyncio.sleep(0)

    asyncio.run(turns())
    frames = [pickle.loads(raw.recv()) for _ in range(3)]
    assert frames == [[("a", i) for i in range(100)], [("b", 0), ("thread", 0)], [("b", 1), ("b", 2)]]
    assert raw.poll(200) == 0  # nothing more
    raw.close(linger=0)

    async def read_back():
        worker.send(("c", 0), consumer_id=0)
        worker.send(("c", 1), consumer_id=0)
        await asyncio.sleep(0)
        return [await transport.areceive(0, timeout=5) for _ in range(2)]

    assert asyncio.run(read_back()) == [("c", 0), ("c", 1)]
    worker.close()
    transport.close()


def test_a_message_that_does_not_pickle_is_dropped_not_its_turn(caplog):
    """One unpicklable message in a turn's batch is dropped, with the error logged; the others of that turn
    still go (they would all have been lost with the batch)."""
    transport = PushPullTransport.create(1)
    raw = zmq.Context.instance().socket(zmq.PULL)
    raw.bind(transport.addresses[0])
    worker = pickle.loads(pickle.dumps(transport))

    async def turn():
        worker.send(("a", 0), consumer_id=0)
        worker.send(("bad", lambda: None), consumer_id=0)
        worker.send(("a", 1), consumer_id=0)
        await asyncio.sleep(0)

    asyncio.run(turn())
    assert pickle.loads(raw.recv()) == [("a", 0), ("a", 1)]
    assert "dropped a message that does not pickle" in caplog.text
    raw.close(linger=0)
    worker.close()
    transport.close()


def test_it_crosses_processes_by_its_addresses_in_a_folder_only_its_user_can_enter():
    transport = PushPullTransport.create(2)
    copy = pickle.loads(pickle.dumps(transport))
    assert copy.addresses == transport.addresses and len(set(transport.addresses)) == 2
    paths = [a.removeprefix("ipc://") for a in transport.addresses]
    folder = transport.folder
    assert all(a.startswith("ipc://") for a in transport.addresses) and all(os.path.dirname(p) == folder for p in paths)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700  # messages are unpickled: no other user may send

    async def bind_and_receive_junk():
        with pytest.raises(Empty):
            await copy.areceive(1, timeout=0.05)  # binds consumer 1's socket
        junk = zmq.Context.instance().socket(zmq.PUSH)
        junk.connect(transport.addresses[1])
        junk.send(b"not a pickle")
        assert await copy.areceive(1, timeout=5) is None  # dropped, and the reader goes on
        transport.send(("uid", "after"), consumer_id=1)
        assert await copy.areceive(1, timeout=5) == ("uid", "after")
        junk.close(linger=0)

    asyncio.run(bind_and_receive_junk())
    copy.close()
    transport.close()
    assert os.path.exists(paths[1])  # close leaves the folder: streams may still be draining


def made_in_a_child(queue) -> None:
    queue.put(PushPullTransport.create(1).folder)


def test_the_folder_goes_when_the_process_that_made_it_exits():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=made_in_a_child, args=(queue,))
    child.start()
    folder = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and folder.startswith(tempfile.gettempdir()) and not os.path.exists(folder)


def test_the_server_sends_worker_messages_over_it(tiny_model_dir):
    """LitServe's own `fast_queue=True` is silently ignored (Lightning-AI/LitServe#751): the server must
    install this transport itself."""
    from ptserve.api import build_server
    from ptserve.config import load_config

    config = load_config(None, environ={}, overrides={("model", "id"): str(tiny_model_dir)})
    server = build_server(config)
    manager = server._init_manager(1)
    try:
        assert isinstance(server._transport, PushPullTransport)
    finally:
        server._transport.close()
        manager.shutdown()


def test_folders_left_by_killed_servers_are_removed_by_the_next(tmp_path, monkeypatch):
    """A server killed before its atexit ran (SIGKILL) leaves its socket folder: the next one removes the
    folders whose lock no running server holds, and only those (not one being made, nor one without a lock
    file, nor one a running server holds, whatever its pid namespace)."""
    import fcntl

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folders = {name: tmp_path / f"ptserve-{name}" for name in ("stale", "held", "young", "nolock")}
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "0.ipc").touch()
        if name != "nolock":
            (folder / "lock").touch()
        if name != "young":
            os.utime(folder, (time.time() - 120, time.time() - 120))
    held = os.open(folders["held"] / "lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a running server holds its own
    try:
        made = PushPullTransport.create(1).folder
        assert [name for name, folder in folders.items() if folder.exists()] == ["held", "young", "nolock"]
    finally:
        os.close(held)
    # the new folder is held by this process: another server would leave it
    os.utime(made, (time.time() - 120, time.time() - 120))
    PushPullTransport.create(1)
    assert os.path.exists(made) and not folders["held"].exists()
