"""What every store keeps: a generation's record, a picture of a conversation's chain, an idempotency key,
their states, and how a record becomes flat fields (SQL columns, a Redis hash) and back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

# A follower (a process) that has not renewed its lease for this long is gone, and its tasks are
# taken over. Recording a task counts as a renewal for a follower the store does not know yet.
FOLLOWER_LEASE = 10.0
CHAIN_LENGTH = 50  # pictures kept in a user's chain, the latest
# A chat platform's conversations and tasks belong to an owner that starts with this mark. No access token's
# digest has it, and no user_id given over HTTP may hold it (domain/params.py): a chat's conversation is
# in a namespace nobody can spell over HTTP, whatever the settings.
CHANNEL_MARK = "\x1f"


class TaskState(StrEnum):
    """Where a generation stands. QUEUED: waiting for its turn at the upstream, nothing paid (domain/queue.py);
    PENDING: given to the upstream (or being given). UNCONFIRMED: the submission's answer was lost, so nobody
    knows whether the upstream made the picture; a late success may still end it. CANCELLED: left the queue."""

    QUEUED = "queued"
    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"
    UNCONFIRMED = "unconfirmed"
    CANCELLED = "cancelled"


SETTLED = (TaskState.SUCCESS, TaskState.FAILED, TaskState.CANCELLED)  # ends that never change


class DeliveryState(StrEnum):
    """How the delivery of an ended task to its target (a webhook, a chat) is doing."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class TaskRecord:
    """One generation in the ledger: what was asked, who follows it, what became of it, and where it goes."""

    task_id: str  # the service's own id, given before the upstream is called
    owner: str  # whose it is: a digest of the access token ("" without tokens), or a chat platform's name
    conversation: str | None  # the user id within the owner's conversations (domain/conversations.py)
    user_id: str | None  # as the caller named it
    mode: str
    source_image_urls: tuple[str, ...]
    used_previous_image: bool
    created_at: float
    callback_secret: str | None = None  # carried in the callback URL; only the upstream knows it
    follower: str = ""  # the process that follows the task to its end
    sequence: int = 0  # order of recording, given by the store
    upstream_task_id: str | None = None
    key_id: str | None = None  # which API key made it (a fingerprint, never the key)
    submitted_at: float | None = None
    taken_at: float | None = None  # when its turn was taken from the queue (the last time, if it went back)
    sending_at: float | None = None  # when its submission was about to go: a task taken but never sent has none
    state: str = TaskState.PENDING
    image_urls: tuple[str, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    completed_at: float | None = None
    prompt: str | None = None
    upstream_image_urls: tuple[str, ...] = ()  # the upstream's own addresses, when image_urls are lasting copies
    deliver_to: str | None = None  # where the end goes: the caller's webhook URL, or a chat (domain/deliveries.py)
    webhook_id: str | None = None  # of the event being delivered: the same on every attempt
    webhook_state: str | None = None  # the delivery's DeliveryState
    webhook_attempts: int = 0
    webhook_due: float | None = None  # when the next attempt may start (or the lease of one under way ends)
    # What to make, besides the prompt and the source pictures, kept so that any process can submit it from the queue
    model: str = "nano-banana"
    aspect_ratio: str | None = None
    resolution: str | None = None
    num_images: int = 1
    lane: str | None = None  # whose turn it is in the queue: the conversation, else the owner
    turn: int = 0  # its turn in the queue (given by the store): lanes take turns, a lane's own tasks keep order

    @property
    def settled(self) -> bool:
        """Its end is known for sure: success or failed."""
        return self.state in SETTLED


@dataclass(frozen=True)
class Picture:
    """One picture of a user's chain (CONTRACT §9)."""

    task_id: str
    image_url: str
    prompt: str | None
    created_at: float  # when it joined the chain
    upstream_image_url: str | None = None  # the upstream's address, while it lives

    @classmethod
    def of(cls, record: TaskRecord, now: float) -> Picture:
        original = record.upstream_image_urls[0] if record.upstream_image_urls else None
        return cls(record.task_id, record.image_urls[0], record.prompt, now, original)


@dataclass(frozen=True)
class Turns:
    """What one take of turns from the queue gave (stores/interface.py, `take_turns`)."""

    taken: list[TaskRecord]  # pending from now on, each with the key its turn was taken with
    next_chance: float | None  # when a key may allow a submission again; None: not before a task ends or is queued
    left: bool  # tasks are still queued after this take


@dataclass(frozen=True)
class IdempotencyKey:
    """A caller's idempotency key, scoped to its access token, and the request it stands for."""

    scope: str  # a digest of the owner and the key: the same key of two owners is two keys
    fingerprint: str  # a digest of the request's parameters


# -- a task record as flat fields, for both stores --------------------------------------

TASK_FIELDS = tuple(field.name for field in fields(TaskRecord))
_TUPLES = ("source_image_urls", "image_urls", "upstream_image_urls")
_FLOATS = ("created_at", "submitted_at", "taken_at", "sending_at", "completed_at", "webhook_due")
_INTEGERS = ("sequence", "webhook_attempts", "turn", "num_images")  # 0 when missing
_TEXTS_NEVER_NONE = ("owner", "follower", "model")
# Every store write and read of a task passes through these two, several times per generation: each is written
# field group by field group rather than with a test per field, which halves its cost.


def task_fields(record: TaskRecord) -> dict[str, Any]:
    """The record as column values: tuples as JSON, booleans as 0/1, None kept."""
    values = dict(record.__dict__)  # a dataclass's fields, in their order
    for name in _TUPLES:
        values[name] = json.dumps(list(values[name]))
    values["used_previous_image"] = int(values["used_previous_image"])
    return values


def task_record(values: Mapping[str, Any]) -> TaskRecord:
    """The record back from column values (Redis gives strings, and "" for None)."""
    decoded = {name: values.get(name) for name in TASK_FIELDS}
    for name, value in decoded.items():
        if value == "":
            decoded[name] = None
    for name in _TUPLES:
        value = decoded[name]
        decoded[name] = tuple(json.loads(value)) if value is not None else ()
    for name in _FLOATS:
        if decoded[name] is not None:
            decoded[name] = float(decoded[name])
    for name in _INTEGERS:
        decoded[name] = int(decoded[name]) if decoded[name] is not None else 0
    for name in _TEXTS_NEVER_NONE:
        decoded[name] = decoded[name] or ""
    decoded["used_previous_image"] = str(decoded["used_previous_image"]) == "1"
    return TaskRecord(**decoded)
