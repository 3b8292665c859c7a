"""Property-based tests of the local API's framing against a real in-process agent (real LiteRT,
the signed digits bundle installed): arbitrary bytes, mutations of valid requests (built with
:func:`agent.localapi.request_head` / :func:`~agent.localapi.tensor_headers`), huge declared byte
counts and dimensions, and ATTACH handshakes with every kind of descriptor.

Whatever arrives, the server answers with well-formed replies (its error reply, status 1, for
what it refuses) and/or closes the connection: never garbage, never a hang, never a dead thread.
Afterwards a fresh :class:`agent.AgentClient` still gets the predictions it got before the
fuzzing, the server's accept thread is alive, no thread died with an exception, and the
process's memory did not balloon (a declared 4 GB tensor must not be allocated).
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import AgentClient
from agent.localapi import (DTYPES, HDR, MAX_REGIONS, SHM_FLAG, TEXT_HEAD, Op, TensorSpec, parse_tensor_headers,
                            request_head, tensor_headers)
from sdk.errors import InferenceError

#: fuzzing must not depend on a database of earlier runs (and must not write one into the repo)
FUZZ = dict(database=None, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                    HealthCheck.too_slow])
REPLY_TIMEOUT = 5.0
MEMORY_BOUND = 1 << 30  # a server that allocated a declared multi-GB tensor passes this at once
_U8_EDGES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x7F, 0x80, 0x81, 0xFE, 0xFF]
_U16_EDGES = [0, 1, 2, 5, 6, 7, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]
_U32_EDGES = [0, 1, 2, 3, 4, 8, 255, 256, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


# --- what the server may answer ------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    text: Optional[str] = None  # a text reply (JSON value, or the error message when status is 1)
    tensors: list[TensorSpec] = field(default_factory=list)


def parse_replies(data: bytes) -> list[Reply]:
    """Every reply frame in ``data``; AssertionError when anything in it is not a well-formed reply."""
    replies, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= HDR.size, f"a truncated reply frame: {data[pos:pos + 64]!r}"
        magic, head_len = HDR.unpack_from(data, pos)
        assert magic == b"ER", f"reply framing {magic!r} is not b'ER': {data[pos:pos + 64]!r}"
        pos += HDR.size
        head = data[pos : pos + head_len]
        assert len(head) == head_len and head_len >= 2, f"a reply head of {len(head)} of {head_len} bytes"
        pos += head_len
        status, count = head[0], head[1]
        if count == 0 and head_len == TEXT_HEAD.size:
            _, _, msg_len = TEXT_HEAD.unpack(head)
            text = data[pos : pos + msg_len]
            assert len(text) == msg_len, f"a text reply of {len(text)} of {msg_len} bytes"
            assert status in (0, 1), f"text reply with status {status}"
            replies.append(Reply(status, text.decode()))
            pos += msg_len
            continue
        assert status == 0, f"a tensor reply with status {status}"
        specs = parse_tensor_headers(head, 2, count)  # InferenceError here: a malformed reply
        size = sum(s.nbytes for s in specs)
        assert len(data) - pos >= size, f"a tensor reply with {len(data) - pos} of {size} bytes"
        replies.append(Reply(0, None, specs))
        pos += size
    return replies


def _read_to_eof(sock: socket.socket, sent: bytes) -> bytes:
    chunks = []
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            raise AssertionError(f"the server neither answered nor closed within {REPLY_TIMEOUT} s after "
                                 f"{len(sent)} bytes and EOF: {sent[:80]!r}") from None
        except ConnectionResetError:  # closed with our bytes unread: a close
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_TIMEOUT)
    sock.connect(path)
    return sock


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed early (it refused what it read first): a close


def exchange(path: str, data: bytes) -> list[Reply]:
    """Send ``data``, then EOF; the well-formed replies received until the server closed."""
    with _connect(path) as sock:
        _send(sock, data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return parse_replies(_read_to_eof(sock, data))


def _read_one_reply(sock: socket.socket) -> Optional[Reply]:
    """One reply frame, or None when the server closed instead."""
    buf = b""
    sock.settimeout(REPLY_TIMEOUT)
    while True:
        try:
            got = parse_replies(buf)
            if got:
                return got[0]
        except AssertionError:
            pass  # not complete yet
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            raise AssertionError(f"no reply and no close within {REPLY_TIMEOUT} s (have {buf[:80]!r})") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            assert not buf, f"the server closed in the middle of a reply: {buf[:80]!r}"
            return None
        buf += chunk


# --- the agent and what it must still do ----------------------------------------------------------------
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Served:
    """The agent with the digits model, its answers from before the fuzzing, and the checks after."""

    def __init__(self, agent, samples: np.ndarray) -> None:
        self.agent = agent
        self.path = str(agent.config.socket_path)
        self.samples = samples
        with AgentClient(self.path) as client:
            self.expected = [client.predict("digits", [x[None]])[0] for x in samples]
            self.expected_raw = client.predict("digits", [np.full((1, 8, 8, 1), 3, np.int8)], raw=True)[0]
        self.thread_errors: list[str] = []
        self.peak_before = _proc_status("VmHWM")

    def hook(self, args: threading.ExceptHookArgs) -> None:
        self.thread_errors.append(f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: {args.exc_value}")

    def check_still_serving(self) -> None:
        assert self.thread_errors == [], f"threads died with exceptions: {self.thread_errors}"
        assert any(t.name == "edgesdk-localapi" and t.is_alive() for t in threading.enumerate()), \
            "the local API's accept thread is gone"
        with AgentClient(self.path) as client:
            assert client.ping()
            for x, y in zip(self.samples, self.expected):
                assert np.array_equal(client.predict("digits", [x[None]])[0], y)
            assert np.array_equal(client.predict("digits", [np.full((1, 8, 8, 1), 3, np.int8)], raw=True)[0],
                                  self.expected_raw)
        grown = _proc_status("VmHWM") - self.peak_before
        assert grown < MEMORY_BOUND, f"the process's peak memory grew by {grown / 2**20:.0f} MiB during the fuzzing"


@pytest.fixture
def served(agent, digits_bundle, digits):
    agent.install(digits_bundle.path)
    s = Served(agent, digits.x_test[:4].astype(np.float32))
    previous = threading.excepthook
    threading.excepthook = s.hook
    yield s
    threading.excepthook = previous


# --- valid requests and their mutations ----------------------------------------------------------------
@dataclass
class Request:
    """A request's bytes and where its integer fields sit (offset, struct format), for mutations."""

    data: bytearray
    fields: list[tuple[int, str]]
    tensor_heads: list[tuple[int, int, bool]]  # (offset of the dtype byte, ndim, in shared memory)


def build_request(op: int, name: bytes, arrays: list[np.ndarray], flags: int = 0,
                  places: Optional[list] = None, inline: bool = True) -> Request:
    headers = tensor_headers(arrays, places) if arrays else b""
    data = bytearray(request_head(op, name, headers, len(arrays), flags))
    fields = [(2, "<H"), (4, "<B"), (5, "<B"), (6, "<B"), (7, "<H")]
    heads = []
    pos = HDR.size + 5 + len(name)
    for i, a in enumerate(arrays):
        shm = places is not None and places[i] is not None
        heads.append((pos, a.ndim, shm))
        fields += [(pos, "<B"), (pos + 1, "<B")] + [(pos + 2 + 4 * k, "<I") for k in range(a.ndim)]
        pos += 2 + 4 * a.ndim
        fields.append((pos, "<I"))
        pos += 4
        if shm:
            fields += [(pos, "<B"), (pos + 1, "<I")]
            pos += 5
    if inline:
        for i, a in enumerate(arrays):
            if places is None or places[i] is None:
                data += np.ascontiguousarray(a).tobytes()
    return Request(data, fields, heads)


def _sample_image(seed: int, dtype: str = "float32") -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        return rng.random((1, 8, 8, 1), dtype=np.float32)
    return rng.integers(-128, 127, (1, 8, 8, 1)).astype(dtype)


@st.composite
def valid_requests(draw) -> Request:
    kind = draw(st.sampled_from(["predict", "raw", "models", "ping", "rollback", "attach", "shm", "many", "publish",
                                 "unknown-op", "batch"]))
    seed = draw(st.integers(0, 1000))
    if kind == "predict":
        return build_request(Op.PREDICT, b"digits", [_sample_image(seed)])
    if kind == "raw":
        return build_request(Op.PREDICT, b"digits", [_sample_image(seed, "int8")], flags=1)
    if kind == "batch":
        return build_request(Op.PREDICT, b"digits", [np.zeros((draw(st.integers(0, 4)), 8, 8, 1), np.float32)])
    if kind == "models":
        return build_request(Op.MODELS, b"", [])
    if kind == "ping":
        return build_request(Op.PING, b"", [])
    if kind == "rollback":
        return build_request(Op.ROLLBACK, draw(st.sampled_from([b"digits", b"nope", b"../x", b""])), [])
    if kind == "attach":
        return build_request(Op.ATTACH, draw(st.sampled_from([b"0 4096", b"15 65536", b"1 1"])), [])
    if kind == "shm":
        return build_request(Op.PREDICT, b"digits", [_sample_image(seed)], places=[(0, 0)])
    if kind == "publish":
        return build_request(Op.PREDICT, b"digits\0key-1", [_sample_image(seed)], flags=2)
    if kind == "unknown-op":
        return build_request(draw(st.sampled_from([0, 6, 99, 255])), b"digits", [])
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=2, max_size=5))
    return build_request(Op.PREDICT, b"digits", [np.zeros((1, 2, 3), d) for d in dtypes])


def _edges(fmt: str) -> list[int]:
    return {"<B": _U8_EDGES, "<H": _U16_EDGES, "<I": _U32_EDGES}[fmt]


@st.composite
def mutated_requests(draw) -> bytes:
    req = draw(valid_requests())
    data = req.data
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["field", "field", "flip", "insert", "delete", "truncate", "append", "resize",
                                    "repeat"]))
        if how == "field" and req.fields:
            pos, fmt = draw(st.sampled_from(req.fields))
            size = struct.calcsize(fmt)
            if pos + size <= len(data):
                value = draw(st.sampled_from(_edges(fmt)) | st.integers(0, 256 ** size - 1))
                struct.pack_into(fmt, data, pos, value)
        elif how == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif how == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 16))]
        elif how == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif how == "append":
            data += draw(st.binary(min_size=1, max_size=256))
        elif how == "resize" and req.tensor_heads:
            # consistent dims and byte count (so the header parses), of up to 64 MiB: only the
            # data is missing. Up to 4 GB: see test_huge_declared_sizes_are_not_allocated.
            pos, ndim, shm = draw(st.sampled_from(req.tensor_heads))
            if pos + 2 + 4 * ndim + 4 <= len(data) and data[pos] & ~SHM_FLAG < len(DTYPES):
                itemsize = DTYPES[data[pos] & ~SHM_FLAG].itemsize
                dims = draw(st.lists(st.integers(0, 4096), min_size=ndim, max_size=ndim))
                if math.prod(dims) * itemsize <= 64 << 20:
                    struct.pack_into(f"<{ndim}II", data, pos + 2, *dims, math.prod(dims) * itemsize)
        elif how == "repeat":
            data += bytes(data)
    return bytes(data)


# --- the tests ----------------------------------------------------------------------------------------
_TENSOR_HEADERS = [
    tensor_headers([np.zeros((1, 8, 8, 1), np.float32)]),
    tensor_headers([np.zeros((2, 3), np.int8), np.zeros((), np.float64)]),
    tensor_headers([np.zeros((4,), np.uint8)], [(3, 128)]),
    tensor_headers([np.zeros((0, 5), np.bool_), np.zeros((1, 1, 1, 1, 1, 1), np.int64)]),
]


@settings(max_examples=600, **FUZZ)
@given(head=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda base, cut, junk: base[:cut] + junk, st.sampled_from(_TENSOR_HEADERS), st.integers(0, 80),
              st.binary(max_size=12)),
    st.builds(lambda base, i, byte: base[:i] + bytes([byte]) + base[i + 1:], st.sampled_from(_TENSOR_HEADERS),
              st.integers(0, 60), st.integers(0, 255)),
), pos=st.integers(0, 8), count=st.integers(0, 300))
def test_parse_tensor_headers_raises_inference_error_only(head: bytes, pos: int, count: int) -> None:
    try:
        specs = parse_tensor_headers(head, pos, count)
    except InferenceError:
        return
    assert len(specs) == count
    for s in specs:  # what it accepts is consistent
        assert s.dtype in DTYPES and s.nbytes == math.prod(s.shape) * s.dtype.itemsize
        assert s.offset is None or 0 <= s.region <= 255


def test_arbitrary_bytes_get_error_replies_or_a_close(served) -> None:
    @settings(max_examples=150, **FUZZ)
    @given(data=st.binary(max_size=2048) | st.builds(lambda tail: b"EQ" + tail, st.binary(max_size=512)))
    def one(data: bytes) -> None:
        exchange(served.path, data)

    one()
    served.check_still_serving()


def test_mutated_requests_get_error_replies_or_a_close(served) -> None:
    seen: set[int] = set()

    @settings(max_examples=300, **FUZZ)
    @given(data=mutated_requests())
    def one(data: bytes) -> None:
        seen.update(r.status for r in exchange(served.path, data))

    one()
    served.check_still_serving()
    assert seen == {0, 1}  # the mutations reached both answers and refusals, not only the framing check
    (reply,) = exchange(served.path, bytes(build_request(Op.PREDICT, b"digits", [np.zeros((2, 3), np.float32)]).data))
    assert reply.status == 1 and "shape" in reply.text  # a wrong shape: the error reply, not an answer


def _huge_requests() -> list[tuple[str, bytes]]:
    """Requests whose headers are consistent and declare gigabytes (or the largest head), with a
    few bytes of data behind them."""
    out = []
    for what, dtype, dims in (("4 GB of uint8", 3, (1, 65535, 65535)), ("4 GB of float32", 0, (1, 32767, 32767)),
                              ("4 GB as one dimension", 3, (0xFFFFFFFF,))):
        itemsize = DTYPES[dtype].itemsize
        head = struct.pack(f"<BB{len(dims)}II", dtype, len(dims), *dims, math.prod(dims) * itemsize)
        out.append((what, request_head(Op.PREDICT, b"digits", head, 1) + b"\x01" * 100))
    many = b"".join(struct.pack("<BB4II", 3, 4, 1, 1024, 1024, 4, 4 << 20) for _ in range(255))  # 255 x 4 MiB
    out.append(("255 tensors of 4 MiB", request_head(Op.PREDICT, b"digits", many, 255)))
    out.append(("the largest head, then nothing", HDR.pack(b"EQ", 0xFFFF) + b"\x01" * 64))
    return out


@pytest.mark.parametrize("what,data", _huge_requests(), ids=[w for w, _ in _huge_requests()])
def test_huge_declared_sizes_are_not_allocated(served, what: str, data: bytes) -> None:
    before = _proc_status("VmSize")
    with _connect(served.path) as sock:
        _send(sock, data)
        reply = None
        deadline = time.monotonic() + 1.0
        grown = 0
        sock.settimeout(0.1)
        while time.monotonic() < deadline and reply is None:  # an answer, or the server waiting for the data
            grown = max(grown, _proc_status("VmSize") - before)
            try:
                chunk = sock.recv(1 << 16)
                reply = parse_replies(chunk) if chunk else []
            except socket.timeout:
                continue
            except ConnectionResetError:
                reply = []
        grown = max(grown, _proc_status("VmSize") - before)
    assert grown < MEMORY_BOUND, f"{what}: the agent's address space grew by {grown / 2**20:.0f} MiB while it read " \
                                 "the request (the declared size was allocated before checking it)"
    assert all(r.status == 1 for r in reply or []), reply
    served.check_still_serving()


def _memfd(size: int, seal: bool) -> int:
    fd = os.memfd_create("fuzz", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def _descriptors(kind: str, size: int) -> list[int]:
    if kind == "sealed":
        return [_memfd(max(size, 1), True)]
    if kind == "sealed-small":
        return [_memfd(max(1, size // 2), True)]
    if kind == "unsealed":
        return [_memfd(max(size, 1), False)]
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return [r]
    if kind == "devnull":
        return [os.open(os.devnull, os.O_RDONLY)]
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return [a.detach()]
    if kind == "two":
        return [_memfd(max(size, 1), True), _memfd(max(size, 1), True)]
    return []


@st.composite
def attach_specs(draw) -> bytes:
    index = draw(st.sampled_from([0, 1, 15, 16, 255, -1]) | st.integers(0, 20))
    size = draw(st.sampled_from([0, 1, 4096, 65536, 2**62, -5]) | st.integers(1, 1 << 20))
    return draw(st.sampled_from([f"{index} {size}".encode(), f"{index}".encode(), f"{index} {size} 7".encode(),
                                 b"", f" {index}  {size} ".encode(), f"{index} {size}e3".encode()])
                | st.binary(max_size=24))


@st.composite
def shm_requests(draw) -> bytes:
    dtype = draw(st.sampled_from(DTYPES[:4]))
    shape = draw(st.sampled_from([(1, 8, 8, 1), (1, 8, 8, 1), (0,), (1, 100000), (2, 8, 8, 1)]))
    region = draw(st.sampled_from([0, 1, 15, 200]))
    offset = draw(st.sampled_from([0, 0, 1, 4095, 4096, 65535, 0xFFFFFFFF]) | st.integers(0, 1 << 17))
    a = np.zeros(shape, dtype)
    return bytes(build_request(Op.PREDICT, b"digits", [a], places=[(region, offset)]).data)


def test_attach_handshakes_with_any_descriptor(served) -> None:
    @settings(max_examples=80, **FUZZ)
    @given(spec=attach_specs(), kind=st.sampled_from(["sealed", "sealed", "sealed-small", "unsealed", "pipe", "devnull",
                                                      "socket", "two", "bytes-only"]),
           then=st.lists(shm_requests() | mutated_requests(), max_size=3))
    def one(spec: bytes, kind: str, then: list[bytes]) -> None:
        attach_then(served.path, spec, kind, then)

    one()
    served.check_still_serving()


def attach_then(path: str, spec: bytes, kind: str, then: list[bytes]) -> None:
    """ATTACH with ``spec``, hand over descriptors of ``kind``; once attached, send ``then``."""
    try:
        size = int(spec.split()[1])
    except (IndexError, ValueError):
        size = 4096
    size = size if 0 < size <= 1 << 20 else 4096
    fds = _descriptors(kind, size)
    try:
        with _connect(path) as sock:
            _send(sock, request_head(Op.ATTACH, spec))
            reply = _read_one_reply(sock)
            if reply is None or reply.status == 1:
                return
            assert reply.text == '"send-fd"', reply
            try:
                if fds:
                    socket.send_fds(sock, [b"F"], fds)
                else:
                    sock.sendall(b"F" * 3)
            except (BrokenPipeError, ConnectionResetError):
                return
            reply = _read_one_reply(sock)
            if reply is None or reply.status == 1:
                return
            assert reply.text == '"attached"', reply
            data = b"".join(then)
            _send(sock, data)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            parse_replies(_read_to_eof(sock, data))
    finally:
        for fd in fds:
            os.close(fd)


def test_the_checks_catch_garbage_and_hangs(tmp_path, monkeypatch) -> None:
    """The harness itself: a server answering garbage, or holding the connection after EOF, fails it."""
    monkeypatch.setattr(__import__(__name__), "REPLY_TIMEOUT", 0.5)
    path = str(tmp_path / "bad.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    held = []

    def serve() -> None:
        for answer in (b"ER\x06\x00\x00\x00\xff\x00\x00\x00", None):  # a text reply longer than what follows; a hang
            conn, _ = listener.accept()
            conn.recv(1024)
            if answer is None:
                held.append(conn)  # never answers, never closes
            else:
                conn.sendall(answer)
                conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(AssertionError, match="text reply of"):
            exchange(path, b"EQ")
        with pytest.raises(AssertionError, match="neither answered nor closed"):
            exchange(path, b"EQ")
    finally:
        t.join(5)
        for conn in held:
            conn.close()
        listener.close()
    with pytest.raises(AssertionError, match="framing"):
        parse_replies(b"XX\x02\x00\x00\x00")
    assert [r.status for r in parse_replies(b"ER\x06\x00\x01\x00\x02\x00\x00\x00no")] == [1]
