"""The local API: AgentClient over the Unix socket to a real agent (real LiteRT), inline and
through shared memory, zero-copy buffers, the cached request and response heads, and requests a
client should never send (refused without hurting other clients)."""

import fcntl
import os
import socket
import threading

import numpy as np
import pytest

from agent import AgentClient
from agent.localapi import DTYPES, MAX_REGIONS, LocalApiServer, Op, request_head, tensor_headers
from sdk.errors import InferenceError


def echo_server(path, outputs=None):
    """A local-API server around a callable instead of an agent: returns the inputs reversed, or
    whatever ``outputs(arrays)`` gives."""
    def predict(name, arrays, raw=False, publish_key=None, reply=None):
        return outputs(arrays) if outputs else arrays[::-1]

    server = LocalApiServer(path, predict, lambda: [], lambda name: {})
    server.start()
    return server


def test_local_socket_api(agent, digits_bundle, digits) -> None:
    agent.install(digits_bundle.path)
    with AgentClient(agent.config.socket_path) as client:
        assert client.ping()
        x = digits.x_test[:1]
        (probs,) = client.predict("digits", [x])
        assert np.array_equal(probs, agent.predict("digits", [x])[0])
        name = client.models()[0]["inputs"][0]
        assert np.array_equal(client.predict("digits", {name: x})[0], probs)
        with pytest.raises(InferenceError, match="must have shape"):
            client.predict("digits", [np.zeros((2, 3), np.float32)])
        assert client.ping()  # the connection survives a bad request
        (raw,) = client.predict("digits", [np.zeros((1, 8, 8, 1), np.int8)], raw=True)
        assert raw.dtype == np.int8


def test_concurrent_clients(agent, digits_bundle, digits) -> None:
    agent.install(digits_bundle.path)
    expected = [agent.predict("digits", [x[None]])[0] for x in digits.x_test[:20]]
    errors = []

    def worker():
        with AgentClient(agent.config.socket_path) as c:
            for x, e in zip(digits.x_test[:20], expected):
                if not np.array_equal(c.predict("digits", [x[None]])[0], e):
                    errors.append("mismatch")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_client_without_agent_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(InferenceError, match="is edgesdk agent run running"):
        AgentClient(tmp_path / "none.sock")


@pytest.mark.parametrize("shm_threshold", [None, 64 * 1024], ids=["inline", "shared-memory"])
def test_local_api_carries_large_tensors_of_every_dtype(tmp_path, shm_threshold) -> None:
    """The framing with a 224x224x3 float image (600 KB, larger than one socket buffer), inline
    and through the shared-memory region."""
    server = echo_server(tmp_path / "echo.sock")
    try:
        with AgentClient(tmp_path / "echo.sock", shm_threshold=shm_threshold) as client:
            rng = np.random.default_rng(0)
            big = rng.random((1, 224, 224, 3), dtype=np.float32)
            small = [np.arange(6).reshape(2, 3).astype(d) for d in DTYPES]
            scalar = np.array(3.5, np.float32)
            out = client.predict("echo", [big, *small, scalar])
            assert [o.dtype for o in out] == [np.dtype(np.float32), *DTYPES[::-1], np.dtype(np.float32)]
            assert np.array_equal(out[-1], big) and np.array_equal(out[0], scalar)
            assert all(np.array_equal(a, b) for a, b in zip(out[1:-1], small[::-1]))
            assert bool(client._regions) == (shm_threshold is not None)
            bigger = rng.random((1, 512, 512, 3), dtype=np.float32)  # outgrows the region: a new one is attached
            assert np.array_equal(client.predict("echo", [bigger])[0], bigger)
    finally:
        server.stop()


def test_shared_memory_inputs_give_the_same_answers_and_bad_headers_are_refused(agent, digits_bundle, digits) -> None:
    agent.install(digits_bundle.path)
    x = digits.x_test[:1]
    with AgentClient(agent.config.socket_path, shm_threshold=0) as shm_client, \
            AgentClient(agent.config.socket_path, shm_threshold=None) as inline_client:
        for sample in digits.x_test[:5]:
            assert np.array_equal(shm_client.predict("digits", [sample[None]])[0], inline_client.predict("digits", [sample[None]])[0])
        assert shm_client._regions and not inline_client._regions
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # a shared-memory tensor, never attached
        raw.connect(str(agent.config.socket_path))
        raw.sendall(request_head(Op.PREDICT, b"digits", tensor_headers([x], [(0, 0)]), 1))
        reply = raw.recv(4096)
        assert b"without an attached region" in reply
        assert raw.recv(10) == b""  # and the agent closed that connection
    with AgentClient(agent.config.socket_path) as client:
        assert client.ping()  # everyone else is served


def test_buffers_reach_the_agent_without_a_copy_and_are_read_at_each_request(agent, digits_bundle, digits,
                                                                             eventually) -> None:
    agent.install(digits_bundle.path)
    with AgentClient(agent.config.socket_path) as client:
        buf = client.buffer((1, 8, 8, 1), np.float32)
        assert buf.flags.writeable and not buf.any()
        for sample in digits.x_test[:5]:  # the same buffer, new contents: the cached request sees them
            buf[0] = sample
            assert np.array_equal(client.predict("digits", [buf])[0], agent.predict("digits", [sample[None]])[0])
        raw = client.buffer((1, 8, 8, 1), np.int8)
        raw[...] = 7
        assert np.array_equal(client.predict("digits", [raw], raw=True)[0],
                              agent.predict("digits", [raw.copy()], raw=True)[0])
        view = buf[:, :, :, :]  # not the buffer itself: sent the ordinary way, same answer
        assert np.array_equal(client.predict("digits", [view])[0], client.predict("digits", [buf])[0])
    # 7 from the client, 7 in-process: the agent answers first and counts right after
    assert eventually(lambda: agent.model("digits").stats.requests == 14)


def test_buffers_survive_new_regions_and_a_larger_scratch_region(tmp_path) -> None:
    server = echo_server(tmp_path / "echo.sock")
    rng = np.random.default_rng(1)
    try:
        with AgentClient(tmp_path / "echo.sock") as client:
            bufs = [client.buffer((1, 224, 224, 3), np.float32) for _ in range(4)]  # 600 KB each: several regions
            for b in bufs:
                b[...] = rng.random(b.shape, dtype=np.float32)
            for b in bufs:
                assert np.array_equal(client.predict("echo", [b])[0], b)
            big = rng.random((1, 512, 512, 3), dtype=np.float32)  # copied: the scratch region grows
            assert np.array_equal(client.predict("echo", [big])[0], big)
            out = client.predict("echo", [bufs[0], big, bufs[3]])  # buffers and copies in one request
            assert all(np.array_equal(o, a) for o, a in zip(out, [bufs[3], big, bufs[0]]))
            with pytest.raises(InferenceError, match="shm_size"):
                for _ in range(2 * MAX_REGIONS):
                    client.buffer((1 << 20,), np.uint8)
            assert np.array_equal(client.predict("echo", [bufs[1]])[0], bufs[1])  # still served
        with AgentClient(tmp_path / "echo.sock", shm_size=4 << 20) as client:
            bufs = [client.buffer((1 << 20,), np.uint8) for _ in range(3)]
            assert len(client._regions) == 1  # all in the reserved region
        with AgentClient(tmp_path / "echo.sock", shm_threshold=None) as client:
            with pytest.raises(InferenceError, match="shared memory is off"):
                client.buffer((4,), np.float32)
    finally:
        server.stop()


def test_a_cached_request_still_gets_outputs_of_a_new_shape(tmp_path) -> None:
    """The response header is reused while the outputs keep their shapes (a model swap may change them)."""
    shapes = iter([(1, 10), (1, 10), (2, 3), (1, 10), ()])
    server = echo_server(tmp_path / "echo.sock", outputs=lambda arrays: [np.ones(next(shapes), np.float32)])
    try:
        with AgentClient(tmp_path / "echo.sock") as client:
            got = [client.predict("echo", [np.zeros(4, np.float32)])[0].shape for _ in range(5)]
        assert got == [(1, 10), (1, 10), (2, 3), (1, 10), ()]
    finally:
        server.stop()


def test_an_output_the_framing_cannot_carry_is_an_error_for_that_caller(tmp_path) -> None:
    def predict(name, arrays, raw=False, publish_key=None, reply=None):
        outputs = [np.zeros(3, np.uint16)] if name == "odd" else arrays
        if reply is not None:
            reply(outputs)
        return outputs

    server = LocalApiServer(tmp_path / "r.sock", predict, lambda: [], lambda name: {})
    server.start()
    try:
        with AgentClient(tmp_path / "r.sock", timeout=10) as client:
            with pytest.raises(InferenceError, match="dtype uint16 cannot be sent"):
                client.predict("odd", [np.zeros(3, np.float32)])
            assert np.array_equal(client.predict("echo", [np.ones(3, np.float32)])[0], np.ones(3, np.float32))
    finally:
        server.stop()


def test_bad_attach_requests_are_refused(agent) -> None:
    def fresh():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(agent.config.socket_path))
        return s

    with fresh() as raw:
        raw.sendall(request_head(Op.ATTACH, f"{MAX_REGIONS} 4096".encode()))
        assert b"bad attach request" in raw.recv(4096)
        assert raw.recv(10) == b""
    with fresh() as raw:  # the handshake, then a byte without a descriptor
        raw.sendall(request_head(Op.ATTACH, b"0 4096"))
        assert b"send-fd" in raw.recv(4096)
        raw.sendall(b"F")
        assert b"attach without a file descriptor" in raw.recv(4096)
        assert raw.recv(10) == b""
    for sealed, size in ((False, 4096), (True, 1024)):  # unsealed (could shrink under the agent), or too small
        fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if sealed:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        with fresh() as raw:
            raw.sendall(request_head(Op.ATTACH, b"0 4096"))
            assert b"send-fd" in raw.recv(4096)
            socket.send_fds(raw, [b"F"], [fd])
            assert b"sealed against shrinking" in raw.recv(4096)
        os.close(fd)
    with fresh() as raw:  # a request that is not this framing at all
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert b"bad request framing" in raw.recv(4096)
    with AgentClient(agent.config.socket_path) as client:
        assert client.ping()


def test_connections_beyond_the_limit_are_turned_away_and_the_others_keep_working(agent_config, digits_bundle, digits,
                                                                                   eventually) -> None:
    from agent import Agent

    agent_config.local_api_max_connections = 2
    agent = Agent(agent_config).start()
    try:
        agent.install(digits_bundle.path)
        x = digits.x_test[:1]
        expected = agent.predict("digits", [x])[0]
        with AgentClient(agent.config.socket_path) as first, AgentClient(agent.config.socket_path) as second:
            assert first.ping() and second.ping()  # both answered: both are being served
            with AgentClient(agent.config.socket_path) as third:
                with pytest.raises(InferenceError, match="serves at most 2 local API connections at once"):
                    third.ping()
            assert np.array_equal(first.predict("digits", [x])[0], expected)
            assert np.array_equal(second.predict("digits", [x])[0], expected)
        # once those two close, a new client gets their place
        def served() -> bool:
            try:
                with AgentClient(agent.config.socket_path) as c:
                    return c.ping()
            except InferenceError:
                return False
        assert eventually(served)
    finally:
        agent.stop()


def test_stop_closes_idle_connections(agent, digits_bundle, digits) -> None:
    agent.install(digits_bundle.path)
    client = AgentClient(agent.config.socket_path)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(10)
    idle.connect(str(agent.config.socket_path))
    try:
        assert client.ping()
        idle.sendall(request_head(Op.PING, b""))
        assert b"pong" in idle.recv(4096)  # served, and now idle
        agent.stop()
        assert idle.recv(10) == b""  # EOF: the agent closed it (a live connection would block here)
        with pytest.raises(InferenceError, match="closed the connection"):
            client.predict("digits", [digits.x_test[:1]])
        assert not agent.config.socket_path.exists()
        with pytest.raises(InferenceError, match="is edgesdk agent run running"):
            AgentClient(agent.config.socket_path)
    finally:
        client.close()
        idle.close()


def test_socket_is_never_reachable_with_looser_permissions(agent_config, monkeypatch) -> None:
    """Under the loosest umask, the socket file is owner-only the moment bind creates it; only then
    is it opened to its mode (0o660), and the process's umask is given back."""
    import stat

    from agent import Agent

    modes = []
    bind = socket.socket.bind

    def bind_and_stat(sock, address):
        bind(sock, address)
        if sock.family == socket.AF_UNIX:
            modes.append(stat.S_IMODE(os.stat(address).st_mode))

    monkeypatch.setattr(socket.socket, "bind", bind_and_stat)
    previous = os.umask(0)
    try:
        agent = Agent(agent_config).start()
        assert os.umask(0) == 0  # given back
    finally:
        os.umask(previous)
    try:
        assert modes and all(mode & 0o077 == 0 for mode in modes), [oct(m) for m in modes]
        assert stat.S_IMODE(os.stat(agent.config.socket_path).st_mode) == 0o660
    finally:
        agent.stop()
