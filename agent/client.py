"""``AgentClient``: how applications on a device ask the agent for inferences.

    from agent import AgentClient
    with AgentClient("/var/lib/edgesdk/agent.sock") as client:
        (probs,) = client.predict("digits", [image])          # float in, float out
        (raw,) = client.predict("digits", [q_image], raw=True)  # integer I/O as the model has it

One client holds one connection; use one per thread (connections are cheap). Inputs of
``shm_threshold`` bytes or more travel through a shared-memory region the client passes to the
agent once (Linux ``memfd``): one memcpy instead of two copies through the kernel.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import threading
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from sdk.errors import InferenceError

from .localapi import _U32, REQ, RESP, BufferedReader, Op, read_tensors, send_parts, shm_heads, tune_socket, write_request

__all__ = ["AgentClient"]


class AgentClient:
    def __init__(self, socket_path: Union[str, os.PathLike], timeout: float = 30.0,
                 shm_threshold: Optional[int] = 64 * 1024) -> None:
        self.socket_path = str(socket_path)
        self.shm_threshold = shm_threshold if hasattr(os, "memfd_create") else None
        self._shm: Optional[mmap.mmap] = None
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

    def _call(self, op: int, name: str = "", arrays: Sequence[np.ndarray] = (), flags: int = 0) -> Any:
        with self._lock:
            arrays = [np.asarray(a) for a in arrays]
            if self.shm_threshold is not None and op == Op.PREDICT and sum(a.nbytes for a in arrays) >= self.shm_threshold:
                self._send_via_shm(name, arrays, flags)
            else:
                write_request(self._sock, op, name, arrays, flags)
            return self._response(op)

    def _send_via_shm(self, name: str, arrays: list[np.ndarray], flags: int) -> None:
        offsets, end = [], 0
        for a in arrays:  # 64-byte aligned slots
            offsets.append(end)
            end += -(-a.nbytes // 64) * 64
        if self._shm is None or len(self._shm) < end:
            self._attach(max(end, 1 << 20))
        for a, off in zip(arrays, offsets):
            np.copyto(np.frombuffer(self._shm, dtype=a.dtype, count=a.size, offset=off).reshape(a.shape), a)
        raw_name = name.encode()
        send_parts(self._sock, [REQ.pack(b"EQ", Op.PREDICT, flags, len(raw_name), len(arrays)), raw_name,
                                *shm_heads(arrays, offsets)])

    def _attach(self, size: int) -> None:
        fd = os.memfd_create("edgesdk-agent-client", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size)
            text = str(size).encode()
            socket.send_fds(self._sock, [REQ.pack(b"EQ", Op.ATTACH, 0, len(text), 0) + text], [fd])
        finally:
            os.close(fd)
        self._response(Op.ATTACH)
        if self._shm is not None:
            self._shm.close()
        self._shm = region

    def _response(self, op: int) -> Any:
        magic, status, count = RESP.unpack(self._reader.read(RESP.size))
        if magic != b"ER":
            raise InferenceError("bad response framing from the agent")
        if status != 0 or (count == 0 and op != Op.PREDICT):
            (n,) = _U32.unpack(self._reader.read(4))
            text = self._reader.read(n).decode()
            if status != 0:
                raise InferenceError(text)
            return json.loads(text)
        return read_tensors(self._reader, count)

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
        return self._call(Op.PREDICT, name, list(inputs), flags)

    def models(self) -> list[dict[str, Any]]:
        return self._call(Op.MODELS)

    def rollback(self, model: str) -> dict[str, Any]:
        return self._call(Op.ROLLBACK, model)

    def ping(self) -> bool:
        return self._call(Op.PING) == "pong"

    def close(self) -> None:
        self._sock.close()
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
