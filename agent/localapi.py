"""The local API: applications on the device talk to the agent over a Unix domain socket.

Framing is binary and small, so a request costs a few struct packs and one copy of the tensor
bytes — no JSON or base64 of tensors. All integers are little-endian.

Request::

    b"EQ" | head_len u16 | head | inline tensor bytes, in order
    head: op u8 | flags u8 | n_tensors u8 | name_len u16 | name | tensor headers
Response::

    b"ER" | head_len u16 | head | tensor bytes, in order
    head: status u8 (0 ok) | n_tensors u8 | tensor headers                 (tensors)
          status u8 (0 ok, 1 error) | 0 | msg_len u32                       (then a JSON or error text)
Tensor header::

    dtype u8 | ndim u8 | dims u32 x ndim | nbytes u32                       (bytes inline)
    dtype|0x80 u8 | ndim u8 | dims u32 x ndim | nbytes u32 | region u8 | offset u32   (in shared memory)

Why a length-prefixed *head*: it is the same bytes for every request to the same model with the
same shapes (and shared-memory slots), so each side parses it once per connection and afterwards
finds the parsed form, the shared-memory views and the response header in a dict. That matters
because after a multi-millisecond inference has swept the caches every Python step costs
microseconds: cutting the per-request steps took MobileNetV2's socket overhead from about
+500 µs to the figures in the README.

The wire format is specified in ``docs/local-api.md`` (enough to write a client in any language;
``clients/c`` is one in C). Ops: ``PREDICT`` (flags bit 0: raw integer I/O; bit 1: also publish
the result to the fleet durably, the name field then being ``model\\0key``), ``MODELS``,
``ROLLBACK``, ``STATUS`` and ``DEPLOY`` (JSON in the message of the response: the only non-tensor
payloads; a deploy carries the bundle as one inline uint8 tensor, at most ``max_bundle_bytes``,
and the name field is the bundle's file name, for messages only), ``PING``, and ``ATTACH``: the
client passes a shared-memory file descriptor (``memfd``; the name field is ``"<region> <size>"``, region
0-15, a new one replacing the old). The agent answers ``"send-fd"``, the client then sends one
byte carrying the descriptor (``SCM_RIGHTS``), and the agent checks it is sealed against
shrinking (``F_SEAL_SHRINK``: a client that shrank it would crash the agent on its next read),
maps it and answers ``"attached"``; inputs can then be offsets into the region. A 600 KB image costs one memcpy into
the region (none with :meth:`agent.AgentClient.buffer`) instead of two copies through the kernel.

Whatever a client sends is checked before the agent spends memory on it:

* A predict request is checked against the active model's inputs (count, dtype, shape and so the
  byte size; :meth:`agent.serving.ActiveModel.request_problem`, the same rules ``predict``
  applies: float inputs to a quantized model are fine unless the raw flag is set) *before* its
  tensor bytes are read, so a header cannot make the agent allocate what it declares. The check
  runs once per cached plan and again only when the model object changes (a new version). A
  refused request gets an error response; its inline bytes are then read and discarded through a
  small buffer and the connection goes on, unless they exceed 64 MiB (then the connection is
  closed after the error response).
* A head that cannot be parsed (bad magic, truncated or inconsistent tensor headers, tensors on
  an op other than predict) leaves the stream out of sync: an error response, then the
  connection is closed. No input makes a connection thread end with an unhandled exception.
* At most ``max_connections`` connections are served at once; one more gets an error response
  and is closed. :meth:`LocalApiServer.stop` closes every live connection and joins its thread.
* The socket is bound under the umask ``0o177`` (owner only) and only then opened to ``mode``,
  so it is never reachable with looser permissions, not even between ``bind`` and ``chmod``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import mmap
import os
import socket
import struct
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from sdk.errors import EdgeSdkError, InferenceError

__all__ = ["LocalApiServer", "Op", "BufferedReader", "TensorSpec", "DTYPES", "SHM_FLAG", "MAX_REGIONS", "HDR",
           "REQ_HEAD", "TEXT_HEAD", "tensor_headers", "parse_tensor_headers", "request_head", "send_parts", "payload",
           "tune_socket", "close_region"]

DTYPES = [np.dtype(t) for t in ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool", "float64")]
_DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
HDR = struct.Struct("<2sH")  # magic, head_len
REQ_HEAD = struct.Struct("<BBBH")  # op, flags, n_tensors, name_len
_RESP_HEAD = struct.Struct("<BB")  # status, n_tensors
TEXT_HEAD = struct.Struct("<BBI")  # status, 0, msg_len: the whole head of a text response
_U32 = struct.Struct("<I")
_SHM_TAIL = struct.Struct("<IBI")  # nbytes, region, offset
SHM_FLAG = 0x80
MAX_REGIONS = 16
MAX_HEAD = 0xFFFF
_MAX_PLANS = 256  # parsed heads kept per connection (a client sending ever-new heads is just slower)
_MAX_SKIP = 64 << 20  # inline bytes of a refused request read and discarded to keep the connection in sync
_SOCKET_UMASK = 0o177  # the socket is created owner-only, then chmod-ed to its mode
_UMASK_LOCK = threading.Lock()  # the umask is per process: two servers starting at once must not interleave
log = logging.getLogger("edgesdk.agent")
_VERSION_HINT = "the client and the agent may be different edgesdk versions: upgrade both"


class Op:
    PREDICT = 1
    MODELS = 2
    PING = 3
    ROLLBACK = 4
    ATTACH = 5
    DEPLOY = 6
    STATUS = 7


#: the ops whose requests carry tensors
_TENSOR_OPS = (Op.PREDICT, Op.DEPLOY)
_BYTES = np.dtype(np.uint8)  # a deploy's one tensor: the bundle file's bytes


class TensorSpec(NamedTuple):
    """One parsed tensor header; ``offset`` is ``None`` for bytes sent inline."""

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    region: int = 0
    offset: Optional[int] = None


class BufferedReader:
    """Reads a connection through one buffer: a whole request or response usually arrives in a
    single ``recv``, and the parser then takes its fields from memory (one syscall, not six)."""

    def __init__(self, sock: socket.socket, size: int = 1 << 14) -> None:
        self.sock = sock
        self.size = size
        self.buf = bytearray()
        self.pos = 0

    def pending(self) -> int:
        """Bytes received but not read yet."""
        return len(self.buf) - self.pos

    def read(self, n: int) -> bytearray:
        pos = self.pos
        end = pos + n
        if end <= len(self.buf):  # the common case: already received
            self.pos = end
            return self.buf[pos:end]
        return self._read_more(n)

    def skip(self, n: int) -> None:
        """Read and discard ``n`` bytes through a buffer of at most ``size`` bytes (nothing of ``n``'s
        size is allocated: a refused request's declared bytes cost no memory)."""
        take = min(n, self.pending())
        self.pos += take
        n -= take
        if not n:
            return
        scratch = memoryview(bytearray(min(n, self.size)))
        while n:
            k = self.sock.recv_into(scratch, min(n, len(scratch)))
            if k == 0:
                raise ConnectionError("peer closed the connection")
            n -= k

    def _read_more(self, n: int) -> bytearray:
        available = len(self.buf) - self.pos
        if n > self.size:
            # a large tensor: receive straight into its own buffer (one copy, from the kernel)
            out = bytearray(n)
            view = memoryview(out)
            view[:available] = self.buf[self.pos :]
            self.buf.clear()
            self.pos = 0
            got = available
            while got < n:
                k = self.sock.recv_into(view[got:], n - got)
                if k == 0:
                    raise ConnectionError("peer closed the connection")
                got += k
            return out
        del self.buf[: self.pos]
        self.pos = 0
        while len(self.buf) < n:
            chunk = self.sock.recv(self.size)
            if not chunk:
                raise ConnectionError("peer closed the connection")
            self.buf += chunk
        self.pos = n
        return self.buf[:n]


_DIMS: dict[int, struct.Struct] = {}


def _dims_struct(ndim: int) -> struct.Struct:
    """``dtype u8 | ndim u8 | dims u32 x ndim``: the part every tensor header starts with."""
    dims = _DIMS.get(ndim)
    if dims is None:
        dims = _DIMS[ndim] = struct.Struct(f"<BB{ndim}I")
    return dims


def tensor_headers(arrays: Sequence[np.ndarray],
                   places: Optional[Sequence[Optional[tuple[int, int]]]] = None) -> bytes:
    """Headers for ``arrays``: inline, or in shared memory at ``places[i] = (region, offset)``."""
    out = []
    for i, a in enumerate(arrays):
        code = _DTYPE_CODE.get(a.dtype)
        if code is None:
            raise InferenceError(f"dtype {a.dtype} cannot be sent over the local API")
        place = places[i] if places is not None else None
        flag = SHM_FLAG if place is not None else 0
        out.append(_dims_struct(a.ndim).pack(code | flag, a.ndim, *a.shape))
        out.append(_U32.pack(a.nbytes) if place is None else _SHM_TAIL.pack(a.nbytes, *place))
    return b"".join(out)


def parse_tensor_headers(head: bytes, pos: int, count: int) -> list[TensorSpec]:
    """Parse ``count`` tensor headers from ``head[pos:]``; every count and size is checked."""
    specs = []
    try:
        for _ in range(count):
            code, ndim = head[pos], head[pos + 1]
            dims = struct.unpack_from(f"<{ndim}I", head, pos + 2) if ndim else ()
            pos += 2 + 4 * ndim
            in_shm = bool(code & SHM_FLAG)
            code &= ~SHM_FLAG
            if code >= len(DTYPES):
                raise InferenceError(f"unknown dtype code {code}")
            dtype = DTYPES[code]
            if in_shm:
                nbytes, region, offset = _SHM_TAIL.unpack_from(head, pos)
                pos += _SHM_TAIL.size
            else:
                (nbytes,) = _U32.unpack_from(head, pos)
                region, offset = 0, None
                pos += 4
            if nbytes != math.prod(dims) * dtype.itemsize:
                raise InferenceError("tensor byte count does not match its shape and dtype")
            specs.append(TensorSpec(dtype, tuple(dims), nbytes, region, offset))
    except (IndexError, struct.error) as exc:
        raise InferenceError(f"truncated tensor header ({_VERSION_HINT})") from exc
    if pos != len(head):
        raise InferenceError(f"unexpected bytes after the tensor headers ({_VERSION_HINT})")
    return specs


def request_head(op: int, name: bytes, headers: bytes = b"", count: int = 0, flags: int = 0) -> bytes:
    """The request's prefix and head, ready to send."""
    head = REQ_HEAD.pack(op, flags, count, len(name)) + name + headers
    if len(head) > MAX_HEAD:
        raise InferenceError(f"request header of {len(head)} bytes is too large (too many tensors or dimensions)")
    return HDR.pack(b"EQ", len(head)) + head


def payload(a: np.ndarray) -> "memoryview | bytes":
    """The array's own bytes (C order) without a copy where it already is contiguous."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return memoryview(a).cast("B") if a.nbytes else b""


def send_parts(sock: socket.socket, parts: list[Any], total: int) -> None:
    """One ``sendmsg`` for all parts (scatter-gather), finishing with sendall if it was partial."""
    sent = sock.sendmsg(parts)
    if sent < total:
        sock.sendall(b"".join(bytes(p) for p in parts)[sent:])


def _text_response(status: int, text: str) -> bytes:
    data = text.encode()
    return HDR.pack(b"ER", TEXT_HEAD.size) + TEXT_HEAD.pack(status, 0, len(data)) + data


def _error(message: str) -> bytes:
    return _text_response(1, message)


def _ok_json(value: Any) -> bytes:
    return _text_response(0, json.dumps(value, default=str))


def tune_socket(sock: socket.socket) -> None:
    """Socket buffers large enough for a 224x224x3 float image in one send."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 21)
        except OSError:
            pass


class _Request:
    """A parsed request head: what to call, the shared-memory views of its inputs (made once),
    the response header of its last answer (outputs keep their shapes, so it is reused), and the
    verdict of the input check against the model it was last checked with."""

    __slots__ = ("op", "flags", "name", "key", "specs", "arrays", "inline", "inline_bytes", "out_sig", "out_head",
                 "out_bytes", "checked", "refusal")

    def __init__(self, head: bytes, regions: dict[int, mmap.mmap]) -> None:
        try:
            op, flags, count, name_len = REQ_HEAD.unpack_from(head)
        except struct.error as exc:
            raise InferenceError(f"truncated request ({_VERSION_HINT})") from exc
        pos = REQ_HEAD.size + name_len
        if pos > len(head):
            raise InferenceError(f"truncated request ({_VERSION_HINT})")
        try:
            text = head[REQ_HEAD.size : pos].decode()
        except UnicodeDecodeError as exc:
            raise InferenceError("the model name is not UTF-8") from exc
        self.op, self.flags = op, flags
        self.name, _, key = text.partition("\0")
        self.key = key if flags & 2 else None
        if count and op not in _TENSOR_OPS:
            raise InferenceError(f"op {op} carries no tensors ({_VERSION_HINT})")
        self.specs = parse_tensor_headers(head, pos, count)
        if op == Op.DEPLOY and [(s.dtype, len(s.shape), s.offset) for s in self.specs] != [(_BYTES, 1, None)]:
            raise InferenceError(f"a deploy request carries the bundle as one inline 1-D uint8 tensor "
                                 f"({_VERSION_HINT})")
        self.inline = any(s.offset is None for s in self.specs)
        self.inline_bytes = sum(s.nbytes for s in self.specs if s.offset is None)
        self.checked: Optional[weakref.ref] = None  # the model the verdict below is for
        self.refusal: Optional[str] = None
        self.arrays: list[Optional[np.ndarray]] = []
        for s in self.specs:
            shm = regions.get(s.region)
            if s.offset is None:
                self.arrays.append(None)
            elif shm is None or s.offset + s.nbytes > len(shm):
                raise InferenceError("a shared-memory tensor without an attached region (or outside it)")
            else:
                count_ = s.nbytes // s.dtype.itemsize
                self.arrays.append(np.frombuffer(shm, dtype=s.dtype, count=count_, offset=s.offset).reshape(s.shape))
        self.out_sig: Optional[list[Any]] = None
        self.out_head = b""
        self.out_bytes = 0

    def check(self, model: Any) -> None:
        """Check the inputs' dtypes and shapes against ``model`` (``request_problem``), remembering
        the verdict for as long as ``model`` is the one serving."""
        signature = [(s.dtype, s.shape) for s in self.specs]
        self.refusal = model.request_problem(signature, bool(self.flags & 1))
        self.checked = weakref.ref(model)

    def inputs(self, reader: BufferedReader) -> list[np.ndarray]:
        if not self.inline:
            return list(self.arrays)  # type: ignore[arg-type]
        return [a if a is not None else np.frombuffer(reader.read(s.nbytes), dtype=s.dtype).reshape(s.shape)
                for a, s in zip(self.arrays, self.specs)]

    def response(self, outputs: Sequence[np.ndarray]) -> tuple[list[Any], int]:
        sig = [(y.shape, y.dtype) for y in outputs]
        if sig != self.out_sig:
            head = _RESP_HEAD.pack(0, len(outputs)) + tensor_headers(outputs)
            self.out_head = HDR.pack(b"ER", len(head)) + head
            self.out_bytes = len(self.out_head) + sum(y.nbytes for y in outputs)
            self.out_sig = sig
        return [self.out_head, *[payload(y) for y in outputs]], self.out_bytes


def close_region(region: mmap.mmap) -> None:
    """Unmap a shared-memory region, unless arrays still point into it (then it goes with them)."""
    try:
        region.close()
    except BufferError:
        pass  # a view is still referenced somewhere; the map goes with it


class LocalApiServer:
    """Serves ``predict``/``models``/``rollback`` for one agent; a thread per connection, at most
    ``max_connections`` of them.

    ``model(name)`` returns the object serving ``name`` (an :class:`~agent.serving.ActiveModel`:
    its ``request_problem`` checks a request's inputs before they are read) or raises
    :class:`~sdk.errors.EdgeSdkError` for a name nothing serves. Without it (tools and tests
    around a bare ``predict`` callable) requests are bounded by ``max_request_bytes`` instead.
    """

    def __init__(self, path: os.PathLike | str, predict: Callable[..., list[np.ndarray]],
                 models: Callable[[], Any], rollback: Callable[[str], Any], *,
                 model: Optional[Callable[[str], Any]] = None, max_connections: int = 64, mode: int = 0o660,
                 max_request_bytes: int = 64 << 20, deploy: Optional[Callable[[bytes, str], Any]] = None,
                 status: Optional[Callable[[], Any]] = None, max_deploy_bytes: int = 512 << 20) -> None:
        self.path = Path(path)
        self._predict, self._models, self._rollback = predict, models, rollback
        self._deploy, self._status = deploy, status
        self.max_deploy_bytes = max_deploy_bytes
        self._model = model
        self.max_connections = max_connections
        self.mode = mode
        self.max_request_bytes = max_request_bytes
        self._sock: Optional[socket.socket] = None
        self._accepter: Optional[threading.Thread] = None
        self._conns: dict[socket.socket, threading.Thread] = {}  # live connections and their threads
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def connections(self) -> int:
        """Connections being served now."""
        with self._lock:
            return len(self._conns)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # a stale socket from a killed agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _UMASK_LOCK:
                previous = os.umask(_SOCKET_UMASK)
                try:
                    sock.bind(str(self.path))
                finally:
                    os.umask(previous)
            os.chmod(self.path, self.mode)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._accepter = threading.Thread(target=self._accept, name="edgesdk-localapi", daemon=True)
        self._accepter.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every live connection and wait for the threads (up to ``timeout``
        seconds each: a request in the middle of an inference finishes first)."""
        with self._lock:
            self._stop.set()
            live = list(self._conns.items())
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        for conn, _ in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread; the thread closes it
            except OSError:
                pass
        for thread in [self._accepter, *(t for _, t in live)]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        if self.path.exists():
            self.path.unlink()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                admitted = len(self._conns) < self.max_connections
                if admitted:
                    thread = threading.Thread(target=self._serve, args=(conn,), name="edgesdk-localapi-conn", daemon=True)
                    self._conns[conn] = thread
                    tune_socket(conn)
                    thread.start()
            if not admitted:
                self._turn_away(conn)

    def _turn_away(self, conn: socket.socket) -> None:
        """One connection too many: say so and close it."""
        try:
            conn.settimeout(1.0)
            conn.sendall(_error(f"the agent serves at most {self.max_connections} local API connections at once: "
                                "close idle clients, or raise local_api_max_connections in the agent's config"))
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        reader = BufferedReader(conn)
        regions: dict[int, mmap.mmap] = {}
        try:
            self._converse(conn, reader, regions)
        except (ConnectionError, OSError):
            pass  # the client went away, or stop() shut the connection
        except Exception as exc:  # whatever a client sends, this thread ends cleanly
            log.warning("local API: closed a connection after %s: %s", type(exc).__name__, exc)
            try:
                conn.sendall(_error(f"internal error: {type(exc).__name__}: {exc}"))
            except OSError:
                pass
        finally:
            for region in regions.values():
                close_region(region)
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _converse(self, conn: socket.socket, reader: BufferedReader, regions: dict[int, mmap.mmap]) -> None:
        """Requests until the client closes, or one leaves the stream out of sync."""
        plans: dict[bytes, _Request] = {}
        model_of = self._model
        while not self._stop.is_set():
            try:
                magic, head_len = HDR.unpack(reader.read(HDR.size))
            except (ConnectionError, OSError):
                return
            if magic != b"EQ":
                conn.sendall(_error(f"bad request framing ({_VERSION_HINT})"))
                return
            head = bytes(reader.read(head_len))
            req = plans.get(head)
            if req is None:
                try:
                    req = self._parse(head, regions)
                except InferenceError as exc:  # the stream cannot be trusted past a bad header
                    conn.sendall(_error(str(exc)))
                    return
                if req.key is None:  # publish requests carry a per-request key: not reused
                    if len(plans) >= _MAX_PLANS:
                        plans.clear()
                    plans[head] = req
            if req.op == Op.ATTACH:
                plans.clear()  # their views may belong to the region being replaced
                if not self._attach(conn, reader, req.name, regions):
                    return
                continue
            if model_of is not None and req.op == Op.PREDICT:
                # checked once per plan and model version: one lookup and one comparison per request
                try:
                    model = model_of(req.name)
                except EdgeSdkError as exc:
                    refusal: Optional[str] = str(exc)
                else:
                    if req.checked is None or req.checked() is not model:
                        req.check(model)
                    refusal = req.refusal
                if refusal is not None:
                    if not self._refuse(conn, reader, req, refusal):
                        return
                    continue
            self._handle(conn, req, req.inputs(reader))

    def _parse(self, head: bytes, regions: dict[int, mmap.mmap]) -> _Request:
        req = _Request(head, regions)
        if req.op == Op.DEPLOY:
            if req.inline_bytes > self.max_deploy_bytes:
                raise InferenceError(f"a bundle of {req.inline_bytes} bytes is more than this agent takes "
                                     f"(max_bundle_bytes {self.max_deploy_bytes}): raise it in the agent's config")
            return req
        if self._model is None and req.inline_bytes > self.max_request_bytes:
            raise InferenceError(f"a request of {req.inline_bytes} bytes is more than this server takes "
                                 f"({self.max_request_bytes})")
        return req

    @staticmethod
    def _refuse(conn: socket.socket, reader: BufferedReader, req: _Request, message: str) -> bool:
        """Answer a request the model does not take; returns whether the connection goes on (its
        inline bytes are discarded unread into memory, up to ``_MAX_SKIP``)."""
        if req.inline_bytes > _MAX_SKIP:
            conn.sendall(_error(f"{message} (the request's {req.inline_bytes} bytes were not read: connection closed)"))
            return False
        reader.skip(req.inline_bytes)
        conn.sendall(_error(message))
        return True

    @staticmethod
    def _attach(conn: socket.socket, reader: BufferedReader, spec: str, regions: dict[int, mmap.mmap]) -> bool:
        """The descriptor handshake; returns whether the connection goes on."""
        try:
            index, size = (int(v) for v in spec.split())
            if not 0 <= index < MAX_REGIONS or size <= 0:
                raise ValueError(spec)
        except ValueError:
            conn.sendall(_error(f"bad attach request {spec!r} (region 0-{MAX_REGIONS - 1} and a size)"))
            return False
        if reader.pending():
            conn.sendall(_error("attach must be the only request in flight"))
            return False
        conn.sendall(_ok_json("send-fd"))
        _, fds, _, _ = socket.recv_fds(conn, 1, 1)
        if not fds:
            conn.sendall(_error("attach without a file descriptor"))
            return False
        try:
            # A region its owner could still shrink would crash the agent (SIGBUS) on the next read.
            if not fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK or os.fstat(fds[0]).st_size < size:
                conn.sendall(_error(f"the shared memory must be a memfd of at least {size} bytes sealed against "
                                    "shrinking (F_SEAL_SHRINK)"))
                return False
            region = mmap.mmap(fds[0], size)  # read-write: LiteRT copies a read-only array twice
        except (ValueError, OSError) as exc:
            conn.sendall(_error(f"cannot map the shared memory: {exc}"))
            return True
        finally:
            for fd in fds:
                os.close(fd)
        old = regions.pop(index, None)
        if old is not None:
            close_region(old)
        regions[index] = region
        conn.sendall(_ok_json("attached"))
        return True

    def _handle(self, conn: socket.socket, req: _Request, arrays: list[np.ndarray]) -> None:
        """Answer one request: a predict answers from its ``reply`` callback (before the agent's
        bookkeeping) or, for a predict callable without one, here."""
        replied = False

        def reply(outputs: list[np.ndarray]) -> None:
            nonlocal replied
            parts, total = req.response(outputs)  # may refuse an output dtype: then answered below
            replied = True
            send_parts(conn, parts, total)

        try:
            if req.op == Op.PREDICT:
                outputs = self._predict(req.name, arrays, raw=bool(req.flags & 1), publish_key=req.key, reply=reply)
                if not replied:
                    send_parts(conn, *req.response(outputs))
                return
            if req.op == Op.MODELS:
                answer = _ok_json(self._models())
            elif req.op == Op.ROLLBACK:
                answer = _ok_json(self._rollback(req.name))
            elif req.op == Op.DEPLOY and self._deploy is not None:
                answer = _ok_json(self._deploy(arrays[0].tobytes(), req.name or "<bundle>"))
            elif req.op == Op.STATUS and self._status is not None:
                answer = _ok_json(self._status())
            elif req.op == Op.PING:
                answer = _ok_json("pong")
            else:
                answer = _error(f"unknown op {req.op}")
        except (ConnectionError, OSError):
            raise
        except EdgeSdkError as exc:
            answer = _error(str(exc))
        except Exception as exc:  # never let one bad request kill the connection thread silently
            answer = _error(f"internal error: {type(exc).__name__}: {exc}")
        if replied:  # failed after answering (bookkeeping): the caller has its outputs
            message = answer[HDR.size + TEXT_HEAD.size :].decode(errors="replace")
            log.warning("after answering %s: %s", req.name, message)
        else:
            conn.sendall(answer)
