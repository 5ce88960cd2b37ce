"""Where the fleet lives in Redis, and what an instance record holds.

    pdserve:instances              SET     ids that registered (pruned when their record is gone)
    pdserve:instance:{id}          HASH    the InstanceRecord below; expires unless heartbeats renew it
    pdserve:epoch:{id}             STRING  the last epoch handed out for {id} (never expires)
    pdserve:blocks:{id}:{epoch}    SET     block hashes (16 hex digits) {id} holds; expires with its record

Each process takes a new epoch when it first registers, so a restarted worker under the same
id starts from an empty block set and never inherits its predecessor's entries (those expire
with the predecessor's record). Values are plain strings, readable with `redis-cli HGETALL`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from pdserve.v1 import worker_pb2
from services.engine.errors import ConfigError

PREFIX = "pdserve:"
INSTANCES = PREFIX + "instances"
RECORD_PREFIX = PREFIX + "instance:"

# Every identity field must agree across the fleet: KV travels between any prefill and decode.
IDENTITY_FIELDS = tuple(f.name for f in worker_pb2.ModelIdentity.DESCRIPTOR.fields)
# What the router needs to agree on to compute the same block hashes as the workers.
HASH_FIELDS = ("block_size", "hash_seed", "hash_scheme_version")
LOAD_FIELDS = ("running", "waiting", "free_kv_blocks", "total_kv_blocks", "requests")

# A Redis call that fails for any of these means "Redis is unavailable", never "the request fails".
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def stop_if_cancelled() -> None:
    """Raise CancelledError if this task has been asked to stop. A cancellation that lands while
    redis-py tears a connection down can be lost (the call then returns or fails normally), and
    a loop that keeps calling Redis would never end; the loops check this every round."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def record_key(instance_id: str) -> str:
    return RECORD_PREFIX + instance_id


def epoch_key(instance_id: str) -> str:
    return f"{PREFIX}epoch:{instance_id}"


def blocks_key(instance_id: str, epoch: int) -> str:
    return f"{PREFIX}blocks:{instance_id}:{epoch}"


def hash_hex(block_hash: int) -> str:
    """Block hashes are uint64; Lua numbers are doubles, so Redis sees them as fixed-width hex."""
    return f"{block_hash:016x}"


class FleetMismatchError(ConfigError):
    """This instance cannot join the fleet: its model identity or hashing differs from the live instances'."""


def connect(url: str, timeout_s: float = 1.0, blocking_pool: bool = False, max_connections: int = 64) -> Redis:
    """An asyncio client that fails fast: no retries, short timeouts. Callers treat failure as an
    outage and carry on (last known registry, buffered index changes) instead of waiting.

    `url` carries a password (redis://:PASSWORD@host:port/db) and TLS (rediss://) when Redis
    requires them. With `blocking_pool` (the router: one lookup per request, in bursts), a call
    waits up to `timeout_s` for one of `max_connections` pooled connections instead of failing
    with "Too many connections" as redis-py's default pool does past its size."""
    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                   decode_responses=True)
    if blocking_pool:
        pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s, **options)
        return Redis(connection_pool=pool)
    return Redis.from_url(url, **options)


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as registered: who, where, which epoch, what it serves, and its last load."""

    instance_id: str
    role: str  # "prefill" | "decode"
    address: str  # host:port that peers dial
    epoch: int
    identity: worker_pb2.ModelIdentity
    max_model_len: int
    load: worker_pb2.LoadResponse

    @property
    def blocks_key(self) -> str:
        return blocks_key(self.instance_id, self.epoch)

    def static_fields(self) -> dict[str, str]:
        """Every field but the load (written at registration)."""
        fields = {"instance_id": self.instance_id, "role": self.role, "address": self.address,
                  "epoch": str(self.epoch), "max_model_len": str(self.max_model_len)}
        fields.update(_message_fields(self.identity, IDENTITY_FIELDS))
        return fields

    def load_fields(self) -> dict[str, str]:
        return load_fields(self.load)

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> InstanceRecord:
        """Parse HGETALL output; raises ValueError on a record this version cannot read."""
        try:
            return cls(
                instance_id=fields["instance_id"],
                role=fields["role"],
                address=fields["address"],
                epoch=int(fields["epoch"]),
                identity=_message_from(worker_pb2.ModelIdentity, fields, IDENTITY_FIELDS),
                max_model_len=int(fields["max_model_len"]),
                load=_message_from(worker_pb2.LoadResponse, fields, LOAD_FIELDS,
                                   instance_id=fields["instance_id"], role=fields["role"]),
            )
        except KeyError as e:
            raise ValueError(f"instance record lacks field {e}") from e


def load_fields(load: worker_pb2.LoadResponse) -> dict[str, str]:
    return _message_fields(load, LOAD_FIELDS)


def hash_mismatch(ours: worker_pb2.ModelIdentity, theirs: worker_pb2.ModelIdentity) -> str | None:
    """What differs in how the two compute block hashes (None: their hashes match ours)."""
    diffs = [f"{name}: ours {getattr(ours, name)!r}, theirs {getattr(theirs, name)!r}"
             for name in HASH_FIELDS if getattr(ours, name) != getattr(theirs, name)]
    return "; ".join(diffs) or None


def _message_fields(msg: Message, names: tuple[str, ...]) -> dict[str, str]:
    return {name: str(getattr(msg, name)) for name in names}


def _message_from(cls: type[Message], fields: dict[str, str], names: tuple[str, ...], **extra) -> Message:
    kwargs = {}
    for name in names:
        field = cls.DESCRIPTOR.fields_by_name[name]
        raw = fields[name]
        kwargs[name] = raw if field.cpp_type == FieldDescriptor.CPPTYPE_STRING else int(raw)
    return cls(**kwargs, **extra)
