"""The life of a generation: record, submit, wait, follow to the end, take over, receive callbacks.

    record (our task id; nothing spent yet) -> submit -> wait (poll, or be woken by a callback)
    -> complete (the user's picture follows the ordering rule) -> notify whoever waits

Every pending task is followed by one process: the one that recorded it. Its submission runs in a
thread of its own (a greenlet under gevent), so a hung upstream never holds the caller; after that the
task is an entry in the process's poll schedule (one thread, and a heap of who is to be asked when),
and its callback, if one comes, ends it at once. Each process renews the lease on all the tasks it
follows with one heartbeat; when a process goes away (crash, restart, deploy) its lease runs out, and
any process of the service takes its tasks over, at start-up and continually (`_keep`). The routes,
the callbacks and the take-over go through the same functions here.
"""

from __future__ import annotations

import _thread
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from config import Settings
from domain.media import Media
from domain.params import GenerationRequest
from domain.webhooks import check_target, webhook_due
from errors import InvalidRequest
from nanobanana_client import (
    CALLBACK_PLACEHOLDER,
    PENDING,
    Generation,
    NanoBananaClient,
    NanoBananaError,
    SubmissionUncertain,
    Task,
    TaskNotFound,
    TaskStatus,
    callback_task_id,
    parse_callback,
)
from stores.records import FOLLOWER_LEASE, TASK_TTL, IdempotencyKey, Store, StoreUnavailable, TaskRecord

log = logging.getLogger(__name__)

KEEPER_EVERY = 1.0  # seconds between two renewals (and take-over sweeps)
PURGE_EVERY = 60.0
TAKE_OVER_BATCH = 500
RECORD_RETRY_MAX = 10.0  # longest pause between attempts to record an end while the store is away
MAX_PAUSE = 60.0  # the poll schedule looks again at least this often

UNCONFIRMED_MESSAGE = (
    "The image service did not confirm that it started this picture, so we cannot tell whether it was made. "
    "It was not sent again, to avoid paying twice; please try again."
)
GIVEN_UP_MESSAGE = "The image service did not finish this picture within a day."
LOST_TASK_MESSAGE = "The image service no longer knows this picture, so it cannot be delivered. Please ask again."
KEY_GONE_MESSAGE = "The API key that started this picture is no longer configured, so it cannot be fetched."


class NotConfigured(Exception):
    """No API key is configured, so nothing can be made."""


class UnknownTask(Exception):
    """from_task names no finished picture of this caller."""


@dataclass
class Following:
    """A task followed by this process; requests for it wait on `ended`."""

    record: TaskRecord
    key: IdempotencyKey | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    refusal: NanoBananaError | None = None  # the upstream refused the submission: nothing was made


class Lifecycle:
    def __init__(self, settings: Settings, client: NanoBananaClient, store: Store, media: Media | None = None):
        self.settings = settings
        self.client = client
        self.store = store
        self.media = media  # where lasting copies of finished pictures go; None: the upstream's addresses stay
        self.follower_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._following: dict[str, Following] = {}
        self._polls: list[tuple[float, int, Following]] = []  # a heap: when each followed task is asked next
        self._poll_order = itertools.count()
        self._polls_changed = threading.Event()
        self._poller: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._keeper: threading.Thread | None = None
        store.on_notify(self._woken)

    # -- the process's part ----------------------------------------------------------------

    def start(self) -> None:
        """Renew this process's lease and take over orphaned tasks, now and every second, until stop()."""
        with self._lock:
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, name="keeper", daemon=True)
                self._keeper.start()

    def stop(self) -> None:
        """Stop following; the lease ends at once, so another process takes the pending tasks over."""
        self._stopping.set()
        self._polls_changed.set()
        with self._lock:
            followed = list(self._following.values())
        for following in followed:
            following.ended.set()  # whoever still waits gets the task as it stands
        if self._keeper is not None:
            self._keeper.join(timeout=5)
        try:
            self.store.retire(self.follower_id)
        except StoreUnavailable:
            log.warning("could not end this process's lease: its tasks are taken over when it runs out")

    # -- a generation request --------------------------------------------------------------

    def generate(self, wanted: GenerationRequest, owner: str = "", deliver_to: str | None = None) -> TaskRecord:
        """Record, submit, and wait up to `wanted.wait` seconds in all; the task is followed to its end anyway.

        The end goes to the caller's callback_url as a webhook, or to `deliver_to` (a Telegram chat).
        """
        deadline = time.monotonic() + wanted.wait
        if not self.settings.configured:
            raise NotConfigured()
        if wanted.callback_url:
            self._check_callback_url(wanted.callback_url)
        key = idempotency_key(wanted, owner)
        earlier = self.store.keyed_task(key) if key else None
        if earlier is not None:
            return self._await(earlier, deadline)
        conversation = conversation_key(owner, wanted.user_id)
        if wanted.reset and conversation:
            self.store.forget(conversation)
        generation, used_previous = self._choose_images(wanted, conversation, owner)
        record, new = self.store.record_task(
            TaskRecord(
                task_id=uuid.uuid4().hex,
                owner=owner,
                conversation=conversation,
                user_id=wanted.user_id,
                mode="image-to-image" if generation.image_urls else "text-to-image",
                source_image_urls=generation.image_urls,
                used_previous_image=used_previous,
                created_at=time.time(),
                callback_secret=secrets.token_urlsafe(18) if self.settings.callbacks else None,
                follower=self.follower_id,
                callback_url=deliver_to or wanted.callback_url,
                prompt=generation.prompt,
            ),
            key,
        )
        following = self._follow(record, generation, key) if new else None
        return self._await(record, deadline, following)

    def task(self, task_id: str, owner: str = "") -> TaskRecord | None:
        """A task of this owner, by either id; a pending one is asked about at most once per poll interval."""
        record = self.store.task(task_id)
        if record is None or record.owner != owner:
            return None
        if record.state != "pending" or record.upstream_task_id is None:
            return record
        task = self._upstream_task(record)
        if task is None or not self.store.claim_poll(record.task_id, self.settings.poll_interval):
            return record
        status = self._ask(task)
        if not status.done:
            return record
        return self._record_end(self._with_copies(ended(record, status)))

    def receive_callback(self, task_id: str, secret: str, body) -> str:
        """Record the end of a task from its callback, if the callback is genuine; wake whoever waits."""
        upstream_task_id = callback_task_id(body)
        if upstream_task_id is None:
            raise InvalidRequest("A callback needs a JSON body with data.taskId.")
        record = self.store.task(task_id or upstream_task_id)
        if record is None or not genuine(record, secret, upstream_task_id):
            log.warning(
                "ignored a callback for task %r: not ours, or not from the upstream", task_id or upstream_task_id
            )
            return upstream_task_id
        status = parse_callback(body)
        if status is not None and not record.settled:
            end = ended(replace(record, upstream_task_id=upstream_task_id), status)
            if self.media is None or end.state != "success":
                self._record_end(end)
            else:  # the upstream waits 15 s at most for the answer; copying the picture may take longer
                _thread.start_new_thread(self._record_callback, (end,))
        return record.task_id

    def _record_callback(self, end: TaskRecord) -> None:
        try:
            self._record_end(self._with_copies(end))
        except StoreUnavailable:
            log.warning("the store is unavailable: task %s ends at its next poll instead", end.task_id)

    # -- following a task ------------------------------------------------------------------

    def _follow(
        self, record: TaskRecord, generation: Generation | None = None, key=None, taken_over=False
    ) -> Following | None:
        """Follow a task to its end: submit it first when `generation` is given, then ask on its schedule."""
        following = Following(record, key)
        with self._lock:
            if record.task_id in self._following or self._stopping.is_set():
                return None
            self._following[record.task_id] = following
        if generation is not None:  # in a thread of its own: a hung submission must hold up nobody
            _thread.start_new_thread(self._submit, (following, generation))
        else:  # a task taken over may have ended long ago: ask at once
            self._schedule(following, time.time() if taken_over else self._next_ask(record))
        return following

    def _submit(self, following: Following, generation: Generation) -> None:
        record = following.record
        try:
            task = self.client.submit(generation, self._callback_url(record))
        except NanoBananaError as failure:
            if not isinstance(failure, SubmissionUncertain):
                following.refusal = failure  # nothing was made: the caller hears why, and may retry
                self._finish(following, settled(record, "failed", failure.code, failure.message))
                if following.key is not None:
                    self._quietly(self.store.release_key, following.key, record.task_id)
                return
            log.warning("task %s: the submission went unanswered; it may have been made", record.task_id)
            following.record = replace(record, error_message=failure.message)
        except Exception:
            log.exception("submitting task %s failed unexpectedly; it may have been made", record.task_id)
        else:
            key_id = self.client.keys.key_id(task.key_number)
            following.record = replace(
                record, upstream_task_id=task.task_id, key_id=key_id, submitted_at=task.submitted_at
            )
            self._quietly(self.store.submitted, record.task_id, task.task_id, key_id, task.submitted_at)
        self._schedule(following, self._next_ask(following.record))

    def _next_ask(self, record: TaskRecord) -> float:
        """When to ask about the task next. Without an upstream id, that is when to stop hoping for its callback."""
        if record.upstream_task_id is not None:
            return self.client.next_poll(record.submitted_at or record.created_at, time.time())
        if not self.settings.callbacks:
            return time.time()
        return record.created_at + self.settings.polling_window + self.settings.submit_read_timeout

    def _ask_when_due(self, following: Following) -> None:
        """The task's turn has come (see _run_polls): ask the upstream, then end the task or ask again later."""
        record = following.record
        try:
            end = self._end_if_known(record)
        except Exception:
            log.exception("asking about task %s failed unexpectedly; asking again later", record.task_id)
            end = None
        if following.ended.is_set():
            return  # a callback ended it meanwhile
        if end is not None:
            self._finish(following, self._with_copies(end))
        elif time.time() >= record.created_at + TASK_TTL:
            self._finish(following, settled(record, "failed", "upstream_error", GIVEN_UP_MESSAGE))
        else:
            self._schedule(following, self._next_ask(record))

    def _end_if_known(self, record: TaskRecord) -> TaskRecord | None:
        if record.upstream_task_id is None:  # the submission's answer was lost, and no callback came
            return settled(record, "unconfirmed", "upstream_error", record.error_message or UNCONFIRMED_MESSAGE)
        task = self._upstream_task(record)
        if task is None:
            return settled(record, "failed", "upstream_error", KEY_GONE_MESSAGE)
        status = self._ask(task)
        return ended(record, status) if status.done else None

    def _finish(self, following: Following, end: TaskRecord) -> None:
        """Record the end, then answer whoever waits. With the store away, answer now and record it when back."""
        following.record = end
        try:
            following.record = self.store.complete_task(end)
        except StoreUnavailable:
            log.warning("the store is unavailable: the end of task %s is recorded when it is back", end.task_id)
            self._release(following)
            following.record = self._record_when_back(end)
        self._release(following)
        self._quietly(self.store.notify, end.task_id)

    def _release(self, following: Following) -> None:
        with self._lock:
            self._following.pop(following.record.task_id, None)
        following.ended.set()

    def _record_when_back(self, end: TaskRecord) -> TaskRecord:
        pause = 0.5
        while not self._stopping.wait(pause):
            try:
                recorded = self.store.complete_task(end)
            except StoreUnavailable:
                pause = min(pause * 2, RECORD_RETRY_MAX)
                continue
            log.info("recorded the end of task %s now that the store is back", end.task_id)
            return recorded
        return end

    def _record_end(self, end: TaskRecord) -> TaskRecord:
        """Record an end learnt from a callback or a status request; whoever follows or waits learns it too."""
        recorded = self.store.complete_task(end)
        self._adopt(recorded)
        self._quietly(self.store.notify, end.task_id)
        return recorded

    def _adopt(self, stored: TaskRecord) -> None:
        """A task followed here was ended elsewhere: stop following it, and answer whoever waits."""
        following = self._following.get(stored.task_id)
        if following is not None and stored.settled:
            following.record = stored
            self._release(following)

    def _woken(self, task_id: str) -> None:
        """Some process says the task ended (a callback or a status request it received): look it up."""
        if task_id in self._following:
            _thread.start_new_thread(self._adopt_stored, (task_id,))

    def _adopt_stored(self, task_id: str) -> None:
        try:
            stored = self.store.task(task_id)
        except StoreUnavailable:
            return  # its schedule asks the upstream anyway
        if stored is not None:
            self._adopt(stored)

    # -- the poll schedule: one thread, and a heap of who is to be asked when -------------------

    def _schedule(self, following: Following, when: float) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            heapq.heappush(self._polls, (when, next(self._poll_order), following))
            sooner = self._polls[0][2] is following
            if self._poller is None:
                self._poller = threading.Thread(target=self._run_polls, name="polls", daemon=True)
                self._poller.start()
        if sooner:
            self._polls_changed.set()

    def _run_polls(self) -> None:
        """Sleep until the earliest due task, then ask about every due one, each in a thread of its own."""
        while not self._stopping.is_set():
            self._polls_changed.clear()
            due, pause = self._due(time.time())
            for following in due:
                _thread.start_new_thread(self._ask_when_due, (following,))
            self._polls_changed.wait(pause)

    def _due(self, now: float) -> tuple[list[Following], float]:
        """The tasks whose turn has come, and how long until the next one's."""
        due = []
        with self._lock:
            while self._polls and self._polls[0][0] <= now:
                following = heapq.heappop(self._polls)[2]
                if not following.ended.is_set():
                    due.append(following)
            pause = self._polls[0][0] - now if self._polls else MAX_PAUSE
        return due, min(pause, MAX_PAUSE)

    # -- waiting for an answer ---------------------------------------------------------------

    def _await(self, record: TaskRecord, deadline: float, following: Following | None = None) -> TaskRecord:
        """The task as it stands when it ends or the caller's wait runs out, whichever comes first."""
        following = following or self._following.get(record.task_id)
        if following is None:
            return self._await_stored(record, deadline)
        following.ended.wait(max(0.0, deadline - time.monotonic()))
        if following.refusal is not None:
            raise following.refusal
        return following.record

    def _await_stored(self, record: TaskRecord, deadline: float) -> TaskRecord:
        """Wait for a task another process follows: its end is in the store, and a notification says when."""
        with self.store.listen(record.task_id) as woken:
            current = self.store.task(record.task_id) or record
            while current.state == "pending" and woken.wait(max(0.0, deadline - time.monotonic())):
                woken.clear()
                current = self.store.task(record.task_id) or current
        return current

    # -- the keeper: lease and take-over -----------------------------------------------------

    def _keep(self) -> None:
        next_purge, store_was_away = 0.0, False
        while True:
            now = time.time()
            try:
                self.store.heartbeat(self.follower_id, now + FOLLOWER_LEASE)
                self._take_over(now)
                if now >= next_purge:
                    self.store.purge(now)
                    next_purge = now + PURGE_EVERY
                if store_was_away:
                    log.info("the store is back")
                store_was_away = False
            except StoreUnavailable as away:
                if not store_was_away:
                    log.warning("the store is unavailable (%s); taking over waits until it is back", away)
                store_was_away = True
            except Exception:
                log.exception("renewing the lease or taking over failed; trying again")
            if self._stopping.wait(KEEPER_EVERY):
                return

    def _take_over(self, now: float) -> None:
        while not self._stopping.is_set():
            orphans = self.store.take_over(self.follower_id, now, TAKE_OVER_BATCH)
            for record in orphans:
                self._follow(record, taken_over=True)
            if orphans:
                log.info("took over %d pending tasks whose follower was gone", len(orphans))
            if len(orphans) < TAKE_OVER_BATCH:
                return

    # -- small helpers -------------------------------------------------------------------------

    def _check_callback_url(self, url: str) -> None:
        if not self.settings.webhook_secret:
            raise InvalidRequest(
                "This service does not send webhooks: its owner has not set WEBHOOK_SECRET. "
                "Leave callback_url out, and ask for the picture at status_url instead."
            )
        check_target(url, self.settings.webhook_allow_private)

    def _choose_images(
        self, wanted: GenerationRequest, conversation: str | None, owner: str
    ) -> tuple[Generation, bool]:
        """Explicit images first, else the picture of from_task, else the user's remembered one, else none."""
        generation = wanted.generation
        if generation.image_urls:
            return generation, False
        if wanted.from_task:
            source = self._picture_of(wanted.from_task, owner)
        elif conversation and (last := self.store.last_picture(conversation)) is not None:
            source = self._editable(last.image_url, last.upstream_image_url)
        else:
            return generation, False
        return replace(generation, image_urls=(source,)), True

    def _picture_of(self, task_id: str, owner: str) -> str:
        """The picture of an earlier task of this caller, to edit it."""
        record = self.store.task(task_id)
        if record is None or record.owner != owner or record.state != "success":
            raise UnknownTask()
        original = record.upstream_image_urls[0] if record.upstream_image_urls else None
        return self._editable(record.image_urls[0], original)

    def _editable(self, image_url: str, original: str | None) -> str:
        """The address to send the upstream for an edit: the lasting copy if the upstream can fetch it."""
        if self.media is None or self.media.reachable or original is None:
            return image_url
        return original

    def _with_copies(self, end: TaskRecord) -> TaskRecord:
        """A success whose pictures are copied to the media store, before anyone is answered or it is remembered."""
        if self.media is None or end.state != "success":
            return end
        copies = tuple(self.media.keep(url) or url for url in end.image_urls)
        return replace(end, image_urls=copies)

    def _upstream_task(self, record: TaskRecord) -> Task | None:
        number = self.client.keys.number_of(record.key_id)
        if number is None or record.upstream_task_id is None:
            return None
        return Task(record.upstream_task_id, number, record.submitted_at or record.created_at)

    def _ask(self, task: Task) -> TaskStatus:
        """Ask the upstream once how the task is doing; a failed question is no answer."""
        try:
            return self.client.status(task)
        except TaskNotFound:
            # Right after submission this may be the upstream catching up; past the window it is lost.
            if time.time() - task.submitted_at > self.settings.polling_window:
                return TaskStatus("failed", error_message=LOST_TASK_MESSAGE)
            return PENDING
        except NanoBananaError as failure:
            log.info("status of task %s unknown: %s", task.task_id, failure.message)
            return PENDING

    def _callback_url(self, record: TaskRecord) -> str:
        if record.callback_secret is None:
            return CALLBACK_PLACEHOLDER
        return (
            f"{self.settings.public_base_url}/nanobanana/callback?task={record.task_id}&secret={record.callback_secret}"
        )

    @staticmethod
    def _quietly(action, *args) -> None:
        """A store write that may wait for better times: the end of the task writes the record whole."""
        try:
            action(*args)
        except StoreUnavailable:
            log.warning("the store is unavailable: %s skipped for now", action.__name__)


def ended(record: TaskRecord, status: TaskStatus) -> TaskRecord:
    """The record with the end the upstream reported."""
    code = None if status.state == "success" else "generation_failed"
    end = settled(record, status.state, code, status.error_message)
    return replace(end, image_urls=status.image_urls, upstream_image_urls=status.image_urls)


def settled(record: TaskRecord, state: str, error_code: str | None, message: str | None) -> TaskRecord:
    """The record as it ended; its webhook, if it has a callback_url, is due from now."""
    end = replace(record, state=state, error_code=error_code, error_message=message, completed_at=time.time())
    return replace(end, **webhook_due(end))


def genuine(record: TaskRecord, secret: str, upstream_task_id: str) -> bool:
    """A callback is the upstream's if it carries the task's secret, for the task it names."""
    if not record.callback_secret or record.upstream_task_id not in (None, upstream_task_id):
        return False
    return hmac.compare_digest(secret.encode("utf-8", "surrogatepass"), record.callback_secret.encode())


def conversation_key(owner: str, user_id: str | None) -> str | None:
    """Where a user's history lives: the same user id under two access tokens is two users."""
    if not user_id:
        return None
    return f"{owner}/{user_id}" if owner else user_id


def idempotency_key(wanted: GenerationRequest, owner: str) -> IdempotencyKey | None:
    """The caller's key within its token's scope, and a digest of what it asked for (the wait aside)."""
    if wanted.idempotency_key is None:
        return None
    scope = hashlib.sha256(f"{owner}\n{wanted.idempotency_key}".encode()).hexdigest()
    asked = {
        **asdict(wanted.generation),
        "user_id": wanted.user_id,
        "reset": wanted.reset,
        "to": wanted.callback_url,
        "from": wanted.from_task,
    }
    fingerprint = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()
    return IdempotencyKey(scope, fingerprint)
