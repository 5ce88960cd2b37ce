"""The channel between a worker's front and its engine-core process: a Unix socketpair carrying
length-prefixed protobuf messages (protos/pdserve/v1/engine.proto), never pickles.

    [4 bytes: length, little-endian][CoreCommands | CoreReady | CoreOutputs]

One side writes from one thread at a time (each end's writer holds a lock); each side reads
from one thread. Blocks of KV travel as raw bytes with dtype and shape.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import TypeVar

import torch
from google.protobuf.message import Message

from pdserve.v1 import engine_pb2
from services.engine.kv_transfer import BlockData

M = TypeVar("M", bound=Message)
_LENGTH = struct.Struct("<I")
MAX_MESSAGE = 1 << 30  # a step of 256 requests with KV blocks stays far below this
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float8_e4m3fn": torch.float8_e4m3fn}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ChannelClosed(ConnectionError):
    """The other side is gone (EOF, or a broken socket)."""


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._write_lock = threading.Lock()

    def send(self, msg: Message) -> None:
        data = msg.SerializeToString()
        with self._write_lock:
            try:
                self.sock.sendall(_LENGTH.pack(len(data)) + data)
            except OSError as e:
                raise ChannelClosed(str(e)) from e

    def recv(self, kind: type[M]) -> M:
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        if length > MAX_MESSAGE:
            raise ChannelClosed(f"a {length}-byte message: the channel is out of step")
        msg = kind()
        msg.ParseFromString(self._read(length))
        return msg

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except OSError as e:
                raise ChannelClosed(str(e)) from e
            if k == 0:
                raise ChannelClosed("end of stream")
            got += k
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def block_to_proto(block: BlockData) -> engine_pb2.CoreBlock:
    t = block.tensor.detach().to("cpu").contiguous()
    msg = engine_pb2.CoreBlock(block_index=block.block_index, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape),
                               data=t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if block.block_hash is not None:
        msg.block_hash = block.block_hash
    if block.scales is not None:
        msg.scales.extend(block.scales.flatten().tolist())
    return msg


def block_from_proto(msg: engine_pb2.CoreBlock) -> BlockData:
    dtype = DTYPES[msg.dtype]
    tensor = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(tuple(msg.shape))
    scales = torch.tensor(list(msg.scales), dtype=torch.float32).view(-1, 2) if msg.scales else None
    return BlockData(msg.block_index, msg.block_hash if msg.HasField("block_hash") else None, tensor, scales)
