"""``AgentClient``: how applications on a device ask the agent for inferences.

    from agent import AgentClient
    with AgentClient("/run/edgesdk/agent.sock") as client:   # an installed agent; else <state_dir>/agent.sock
        (probs,) = client.predict("digits", [image])          # float in, float out
        (raw,) = client.predict("digits", [q_image], raw=True)  # integer I/O as the model has it

        frame = client.buffer((1, 224, 224, 3), "float32")   # zero-copy: fill it in place ...
        np.divide(camera_image, 127.5, out=frame); frame -= 1
        (logits,) = client.predict("mobilenet", [frame])     # ... and it reaches the agent as is

        client.status()                                       # models, broker link, outbox, last install
        client.deploy(open("digits-2.edgebundle", "rb").read())   # verified, health-checked, swapped

One client holds one connection; use one per thread (connections are cheap). Inputs of
``shm_threshold`` bytes or more travel through a shared-memory region the client passes to the
agent once (Linux ``memfd``): one memcpy instead of two copies through the kernel. Arrays made by
:meth:`AgentClient.buffer` live in shared memory already, so they cost no copy at all, the way
pycoral's ``input_tensor`` lets an application write into the interpreter's input.

The wire format is specified in ``docs/local-api.md``; ``clients/c`` holds a client in C.
"""

from __future__ import annotations

import fcntl
import json
import math
import mmap
import os
import socket
import threading
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from sdk.errors import InferenceError, InstallError

from .localapi import (HDR, MAX_REGIONS, TEXT_HEAD, BufferedReader, Op, TensorSpec, close_region, parse_tensor_headers,
                       payload, request_head, send_parts, tensor_headers, tune_socket)

__all__ = ["AgentClient"]

_SCRATCH = 0  # region for inputs copied in; the regions after it hold buffers made by buffer()
#: the ops whose refusals are install errors (the rest are inference errors)
_INSTALL_OPS = (Op.ROLLBACK, Op.DEPLOY)
_MIN_REGION = 1 << 20
_MAX_PLANS = 256


def _aligned(n: int) -> int:
    return max(64, -(-n // 64) * 64)


class _Plan(NamedTuple):
    """A request's bytes up to its inline tensors, made once per model name, flags and input
    shapes (or buffers): which inputs are copied into the scratch region and which go inline."""

    head: bytes
    copies: list[tuple[int, np.ndarray]]
    inline: list[int]
    total: int


class AgentClient:
    def __init__(self, socket_path: Union[str, os.PathLike], timeout: float = 30.0,
                 shm_threshold: Optional[int] = 64 * 1024, shm_size: int = 0) -> None:
        """``shm_threshold``: inputs of this many bytes or more (together) go through shared memory;
        ``None`` sends everything inline. ``shm_size``: bytes to reserve for :meth:`buffer` up
        front (otherwise regions are added as buffers are made)."""
        self.socket_path = str(socket_path)
        self.shm_threshold = shm_threshold if hasattr(os, "memfd_create") else None
        self._regions: dict[int, mmap.mmap] = {}
        self._buffer_region = 0  # index of the region new buffers are carved from (0: none yet)
        self._buffer_used = 0
        self._buffers: dict[int, tuple[np.ndarray, int, int]] = {}  # id -> (array, region, offset)
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._responses: dict[bytes, list[TensorSpec]] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        tune_socket(self._sock)
        try:
            self._sock.connect(self.socket_path)
        except OSError as exc:
            self._sock.close()
            raise InferenceError(
                f"cannot reach the agent at {self.socket_path} ({exc.strerror or exc}): is edgesdk agent run running?"
            ) from exc
        self._lock = threading.Lock()
        self._reader = BufferedReader(self._sock)
        if shm_size > 0:
            with self._lock:
                self._new_buffer_region(shm_size)

    # --- shared memory ---------------------------------------------------------------------------
    def buffer(self, shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
        """A zeroed array in shared memory: fill it in place and pass it to :meth:`predict`, and it
        reaches the agent without a copy. Buffers live as long as the client; reuse them."""
        if self.shm_threshold is None:
            raise InferenceError("shared memory is off for this client (shm_threshold=None, or no memfd here)")
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        count = math.prod(shape)
        size = _aligned(count * dtype.itemsize)
        with self._lock:
            region = self._regions.get(self._buffer_region)
            if region is None or self._buffer_used + size > len(region):
                self._new_buffer_region(max(_MIN_REGION, 2 * size))
                region = self._regions[self._buffer_region]
            offset = self._buffer_used
            self._buffer_used += size
            a = np.frombuffer(region, dtype=dtype, count=count, offset=offset).reshape(shape)
            self._buffers[id(a)] = (a, self._buffer_region, offset)
        return a

    def _new_buffer_region(self, size: int) -> None:
        index = max(self._regions, default=_SCRATCH) + 1
        if index >= MAX_REGIONS:
            raise InferenceError(f"this client has {MAX_REGIONS - 1} shared-memory regions of buffers already: "
                                 "reuse buffers, or reserve room with AgentClient(..., shm_size=BYTES)")
        self._attach(index, size)
        self._buffer_region, self._buffer_used = index, 0

    def _attach(self, index: int, size: int) -> None:
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = os.memfd_create("edgesdk-agent-client", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)  # the agent requires it
            region = mmap.mmap(fd, size)
            self._sock.sendall(request_head(Op.ATTACH, f"{index} {size}".encode()))
            self._response(Op.ATTACH)  # "send-fd"
            socket.send_fds(self._sock, [b"F"], [fd])
            self._response(Op.ATTACH)  # "attached"
        finally:
            os.close(fd)
        old = self._regions.pop(index, None)
        if old is not None:
            close_region(old)
        self._regions[index] = region
        self._plans.clear()

    # --- requests ----------------------------------------------------------------------------
    def _plan(self, name: bytes, flags: int, arrays: list[np.ndarray],
              registered: list[Optional[tuple[int, int]]]) -> _Plan:
        copy = [i for i, (a, r) in enumerate(zip(arrays, registered)) if r is None]
        to_shm = (self.shm_threshold is not None and copy
                  and sum(arrays[i].nbytes for i in copy) >= self.shm_threshold)
        places: list[Optional[tuple[int, int]]] = list(registered)
        copies: list[tuple[int, np.ndarray]] = []
        if to_shm:
            need = sum(_aligned(arrays[i].nbytes) for i in copy)
            scratch = self._regions.get(_SCRATCH)
            if scratch is None or len(scratch) < need:
                self._attach(_SCRATCH, max(_MIN_REGION, 2 * need))
                scratch = self._regions[_SCRATCH]
            offset = 0
            for i in copy:
                a = arrays[i]
                places[i] = (_SCRATCH, offset)
                copies.append((i, np.frombuffer(scratch, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)))
                offset += _aligned(a.nbytes)
        inline = [i for i, p in enumerate(places) if p is None]
        head = request_head(Op.PREDICT, name, tensor_headers(arrays, places), len(arrays), flags)
        return _Plan(head, copies, inline, len(head) + sum(arrays[i].nbytes for i in inline))

    def _predict(self, name: str, arrays: list[np.ndarray], flags: int) -> list[np.ndarray]:
        with self._lock:
            registered: list[Optional[tuple[int, int]]] = []
            parts: list[Any] = [name, flags]
            for a in arrays:
                entry = self._buffers.get(id(a))
                if entry is not None and entry[0] is a:
                    registered.append(entry[1:])
                    parts.append(id(a))
                else:
                    registered.append(None)
                    parts.append((a.shape, a.dtype))
            key = tuple(parts)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plan(name.encode(), flags, arrays, registered)
                if not flags & 2:  # a publish key makes every request's head different
                    if len(self._plans) >= _MAX_PLANS:
                        self._plans.clear()
                    self._plans[key] = plan
            for i, view in plan.copies:
                np.copyto(view, arrays[i])
            try:
                send_parts(self._sock, [plan.head, *[payload(arrays[i]) for i in plan.inline]], plan.total)
            except OSError as exc:
                raise self._closed(exc) from exc
            return self._response(Op.PREDICT)

    def _call(self, op: int, name: str = "", data: Optional[np.ndarray] = None, timeout: Optional[float] = None) -> Any:
        """A request answered in JSON; ``data``: the one inline tensor it carries (a deploy's bundle);
        ``timeout``: seconds to wait for this answer instead of the client's timeout."""
        with self._lock:
            before = self._sock.gettimeout()
            if timeout is not None:
                self._sock.settimeout(timeout)
            try:
                try:
                    if data is None:
                        self._sock.sendall(request_head(op, name.encode()))
                    else:
                        head = request_head(op, name.encode(), tensor_headers([data]), 1)
                        send_parts(self._sock, [head, payload(data)], len(head) + data.nbytes)
                except OSError as exc:
                    raise self._closed(exc) from exc
                try:
                    return self._response(op)
                except TimeoutError as exc:
                    raise InferenceError(f"the agent did not answer within {self._sock.gettimeout():g} s (it may "
                                         "still finish: see edgesdk agent status)") from exc
            except InferenceError as exc:
                if op in _INSTALL_OPS:
                    raise InstallError(str(exc)) from exc
                raise
            finally:
                self._sock.settimeout(before)

    def _closed(self, exc: OSError) -> InferenceError:
        """The agent closed the connection before taking a request: what it said before closing
        (it turns away connections beyond its limit with an error response), or that it closed."""
        try:
            self._response(Op.PING)
        except InferenceError as said:
            return said
        except Exception:  # nothing buffered, or not a response: report the closed connection
            pass
        return InferenceError(f"the agent closed the connection ({exc.strerror or exc}): open a new AgentClient "
                              "(is edgesdk agent run still running?)")

    def _response(self, op: int) -> Any:
        magic, head_len = HDR.unpack(self._reader.read(HDR.size))
        if magic != b"ER":
            raise InferenceError("bad response framing from the agent (are client and agent the same edgesdk version?)")
        head = bytes(self._reader.read(head_len))
        specs = self._responses.get(head)
        if specs is None:
            status, count = head[0], head[1]
            if count == 0 and len(head) == TEXT_HEAD.size:  # a JSON value or an error message
                text = self._reader.read(TEXT_HEAD.unpack(head)[2]).decode()
                if status != 0:
                    raise InferenceError(text)
                return json.loads(text)
            specs = parse_tensor_headers(head, 2, count)
            if len(self._responses) >= _MAX_PLANS:
                self._responses.clear()
            self._responses[head] = specs
        return [np.frombuffer(self._reader.read(s.nbytes), dtype=s.dtype).reshape(s.shape) for s in specs]

    def predict(self, model: str, inputs: Union[Sequence[np.ndarray], Mapping[str, np.ndarray], np.ndarray],
                *, raw: bool = False, publish_key: Optional[str] = None) -> list[np.ndarray]:
        """Run ``model`` on ``inputs`` (by position; a mapping is ordered by the model's input names).

        With ``publish_key`` the agent also sends the result to the fleet through its durable
        outbox (the call fails with the outbox's reason when it is full)."""
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            names = [m["inputs"] for m in self.models() if m["name"] == model]
            if not names:
                raise InferenceError(f"no model named {model!r} is active")
            try:
                inputs = [inputs[n] for n in names[0]]
            except KeyError as exc:
                raise InferenceError(f"{model}: missing input {exc}") from exc
        flags = (1 if raw else 0) | (2 if publish_key is not None else 0)
        name = model if publish_key is None else f"{model}\0{publish_key}"
        return self._predict(name, [a if type(a) is np.ndarray else np.asarray(a) for a in inputs], flags)

    def models(self) -> list[dict[str, Any]]:
        return self._call(Op.MODELS)

    def rollback(self, model: str) -> dict[str, Any]:
        """Reactivate ``model``'s previous version; InstallError with the agent's reason when it cannot."""
        return self._call(Op.ROLLBACK, model)

    def deploy(self, bundle: bytes, name: str = "", *, timeout: Optional[float] = 600.0) -> dict[str, Any]:
        """Install a signed bundle: verified, health-checked and swapped in exactly as a fleet
        update, its outcome reported to the fleet. ``name`` (the bundle's file name) is for the
        agent's messages; ``timeout``: seconds to wait (loading and checking a large model takes
        a while). Returns the install's summary; InstallError with the reason when it is refused
        (the model that was active keeps serving)."""
        return self._call(Op.DEPLOY, name, np.frombuffer(bytes(bundle), dtype=np.uint8), timeout)

    def status(self) -> dict[str, Any]:
        """What the agent runs (models, versions), its broker link, outbox depth and last install."""
        return self._call(Op.STATUS)

    def ping(self) -> bool:
        return self._call(Op.PING) == "pong"

    def close(self) -> None:
        self._sock.close()
        self._plans.clear()
        self._buffers.clear()
        for region in self._regions.values():
            close_region(region)  # buffers the application still holds keep theirs
        self._regions.clear()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
