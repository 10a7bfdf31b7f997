"""The life of a generation: record, submit, wait, follow to its end, complete.

    record (queued; nothing spent yet) -> its turn (domain/queue.py) -> submit -> wait (poll, or be woken
    by a callback) -> complete (the user's chain follows the ordering rule; a media copy; a delivery queued)
    -> notify whoever waits

Every generation is recorded as queued and goes to the upstream when its turn comes, taken by whichever
process's dispatcher finds it. A busy upstream sends it back to its turn; a queued task may be cancelled,
and one queued too long fails, paid nothing. Every pending task is followed by one process: the one that
took its turn, or the one that took it over when that one was gone (domain/keeper.py). Its submission runs
as short work of its own, so a hung upstream never holds the caller; after that the task waits in the poll
schedule (domain/polls.py), and its callback, if one comes, ends it at once. Who waits for which task, and
how they hear of its end, is domain/waiting.py. The routes, the callbacks, the chat channels and the
take-over all go through the functions here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace

from background import Background
from config import TASK_TTL, Settings
from domain.conversations import Conversations, conversation_key
from domain.deliveries import Deliveries, delivery_due
from domain.keeper import Keeper
from domain.media import Media
from domain.params import GenerationRequest
from domain.polls import PollSchedule
from domain.queue import Dispatcher
from domain.uploads import Uploads
from domain.waiting import WAITING, Following, Waiting, Watch, is_over
from errors import AlreadySubmitted, InvalidRequest, NoKeyUsable, NotConfigured, StoreUnavailable
from nanobanana_client import (
    CALLBACK_PLACEHOLDER,
    PENDING,
    Generation,
    KeyRefused,
    NanoBananaClient,
    NanoBananaError,
    SubmissionUncertain,
    Task,
    TaskNotFound,
    TaskStatus,
    UpstreamBusy,
    UpstreamUnavailable,
    callback_task_id,
    parse_callback,
)
from stores.interface import Store
from stores.records import IdempotencyKey, TaskRecord, TaskState

log = logging.getLogger(__name__)

RECORD_RETRY_MAX = 10.0  # longest pause between attempts to record an end while the store is away


UNCONFIRMED_MESSAGE = (
    "The image service did not confirm that it started this picture, so we cannot tell whether it was made. "
    "It was not sent again, to avoid paying twice; please try again."
)
GIVEN_UP_MESSAGE = "The image service did not finish this picture within a day."
LOST_TASK_MESSAGE = "The image service no longer knows this picture, so it cannot be delivered. Please ask again."
KEY_GONE_MESSAGE = "The API key that started this picture is no longer configured, so it cannot be fetched."
CANCELLED_MESSAGE = "This picture was cancelled before it was started; nothing was charged."
QUEUED_TOO_LONG_MESSAGE = (
    "The image service was too busy to start this picture in time, so it was given up; nothing was charged. "
    "Please try again later."
)


class Lifecycle:
    def __init__(
        self,
        settings: Settings,
        client: NanoBananaClient,
        store: Store,
        conversations: Conversations,
        deliveries: Deliveries,
        background: Background,
        media: Media | None = None,
        uploads: Uploads | None = None,
        waited_in_queue: Callable[[float], None] = lambda seconds: None,
    ):
        """`waited_in_queue(seconds)` hears how long each task waited for its turn (for metrics)."""
        self.settings = settings
        self.client = client
        self.store = store
        self.conversations = conversations
        self.deliveries = deliveries
        self.background = background
        self.media = media  # where lasting copies of finished pictures go; None: the upstream's addresses stay
        self.uploads = uploads  # pictures people uploaded: each use keeps one longer
        self.waited_in_queue = waited_in_queue
        self._copying: set[str] = set()  # tasks whose pictures are being copied now: one copy per task at a time
        self._copies_lock = threading.Lock()
        self.follower_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.polls: PollSchedule[Following | Watch] = PollSchedule(background, self._when_due, is_over)
        self.waiting = Waiting(store, background, self.polls.add)
        self.keeper = Keeper(
            store,
            self.follower_id,
            self._take_over,
            background,
            conversations.drop_copies,
            uploads.drop if uploads else lambda urls: None,
        )
        self.queue = Dispatcher(
            store,
            settings.pacing,
            self.follower_id,
            self._usable_key_ids,
            self._take_turn,
            self._queued_too_long,
            self._stranded,
            settings.queue_max_wait,
            background,
        )

    # -- the process's part ----------------------------------------------------------------

    def start(self) -> None:
        """Renew this process's lease and take over orphaned tasks, and take turns from the queue, until stop()."""
        self.keeper.start()
        self.queue.start()

    def answer_waiters(self) -> None:
        """Stopping (background.stopping is set): whoever still waits gets the task as it stands."""
        self.waiting.answer_all()

    def retire(self) -> None:
        """Stopped: the lease ends at once, so another process takes the pending tasks over."""
        self.keeper.retire()

    # -- a generation request --------------------------------------------------------------

    def generate(self, wanted: GenerationRequest, owner: str = "", deliver_to: str | None = None) -> TaskRecord:
        """Record, submit, and wait up to `wanted.wait` seconds in all; the task is followed to its end anyway.

        The end goes to `deliver_to` (a chat) or the caller's callback_url, when there is one.
        """
        deadline = time.monotonic() + wanted.wait
        if not self.settings.configured:
            raise NotConfigured()
        if wanted.callback_url:
            self.deliveries.check_target(wanted.callback_url)
        key = idempotency_key(wanted, owner)
        earlier = self.store.keyed_task(key) if key else None
        if earlier is not None and nothing_made(earlier):  # nothing was made: the key may be used again
            self.store.release_key(key, earlier.task_id)
        elif earlier is not None:
            return self.waiting.until_ended(earlier, deadline)
        self._check_keys()
        conversation = conversation_key(owner, wanted.user_id)
        remembered = None if wanted.reset else conversation  # reset: the remembered picture is not edited
        generation, used_previous = self.conversations.source(wanted, remembered, owner)
        if self.uploads:  # only images the caller named can be uploads: an edit's remembered picture never is
            self.uploads.used(wanted.generation.image_urls)
        if wanted.reset and conversation:  # the copies go in the background: the caller waits for its picture
            self.conversations.forget(conversation, spare=generation.image_urls, wait=False)
        record, new = self.store.record_task(
            self._new_record(generation, used_previous, owner, conversation, wanted, deliver_to),
            key,
            queue_max=self.settings.queue_max,
        )
        following = self._wait_in_line(record) if new else None
        return self.waiting.until_ended(record, deadline, following)

    def wait(self, record: TaskRecord, seconds: float) -> TaskRecord:
        """Wait up to `seconds` more for a task to end; the task as it stands then (a refused submission is a
        failed task here: the refusal itself is the answer of the request that made it)."""
        try:
            return self.waiting.until_ended(record, time.monotonic() + seconds)
        except NanoBananaError:
            return self.store.task(record.task_id) or record

    def cancel(self, task_id: str, owner: str = "") -> TaskRecord | None:
        """Cancel a queued task of this owner (it is never submitted); AlreadySubmitted once it has left the queue."""
        record = self.store.task(task_id)
        if record is None or record.owner != owner:
            return None
        if record.state == TaskState.CANCELLED:
            return record
        ended = self._end_queued(record, TaskState.CANCELLED, "cancelled", CANCELLED_MESSAGE)
        if ended is not None:
            return ended
        if (self.store.task(task_id) or record).state in WAITING:
            raise AlreadySubmitted()
        raise AlreadySubmitted("This picture has already ended, so there is nothing to cancel.")

    def queue_position(self, record: TaskRecord) -> int | None:
        """Where a queued task stands in line (1: next); None once it has left the queue, or while the store is away."""
        if record.state != TaskState.QUEUED:
            return None
        try:
            return self.store.queue_position(record)
        except StoreUnavailable:
            return None

    def task(self, task_id: str, owner: str = "") -> TaskRecord | None:
        """A task of this owner, by either id; a pending one is asked about at most once per poll interval. A
        read needs no write: when the store takes none (a full disk), the task is answered as it stands, or as
        the upstream says it ended (its follower records that when the store is back)."""
        record = self.store.task(task_id)
        if record is None or record.owner != owner:
            return None
        if record.state != TaskState.PENDING or record.upstream_task_id is None:
            return record
        task = self._upstream_task(record)
        if task is None or not self._quietly(self.store.claim_poll, record.task_id, self.settings.poll_interval):
            return record
        status = self._ask(task)
        if not status.done:
            return record
        end = ended(record, status)
        if self._needs_copies(end):  # a slow picture must not hold this read: it is pending until copied
            self._copy_in_background(end)
            return record
        return self._quietly(self._record_end, end) or end

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
            end = ended(record, status, upstream_task_id=upstream_task_id)
            if self._needs_copies(end):  # the upstream waits 15 s at most for the answer; a copy may take longer
                self._copy_in_background(end)
            else:
                self._record_end(end)
        return record.task_id

    def _new_record(
        self,
        generation: Generation,
        used_previous: bool,
        owner: str,
        conversation: str | None,
        wanted: GenerationRequest,
        deliver_to: str | None,
    ) -> TaskRecord:
        return TaskRecord(
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
            deliver_to=deliver_to or wanted.callback_url,
            prompt=generation.prompt,
            state=TaskState.QUEUED,
            model=generation.model,
            aspect_ratio=generation.aspect_ratio,
            resolution=generation.resolution,
            num_images=generation.num_images,
            lane=conversation or f"owner:{owner}",
        )

    def _check_keys(self) -> None:
        """A new generation needs a usable key; without one it is refused before anything is recorded, as a
        ServiceError (a chat says it as it is), like a full queue (QueueFull, from record_task)."""
        try:
            self.client.first_usable_key()
        except UpstreamUnavailable as no_key:
            retry = {"Retry-After": str(round(no_key.retry_after))} if no_key.retry_after else None
            raise NoKeyUsable(no_key.message, retry) from None

    def _needs_copies(self, end: TaskRecord) -> bool:
        return self.media is not None and end.state == TaskState.SUCCESS

    def _copy_in_background(self, end: TaskRecord) -> None:
        """Copy the pictures of a success, then record it: apart from whoever learnt of it, once per task at a time."""
        if self._start_copying(end.task_id) and not self.background.spawn(self._copy_then_record, end):
            self._stop_copying(end.task_id)

    def _copy_then_record(self, end: TaskRecord) -> None:
        try:
            self._record_end(self._with_copies(end))
        except StoreUnavailable:
            log.warning("the store is unavailable: task %s ends at its next poll instead", end.task_id)
        finally:
            self._stop_copying(end.task_id)

    def _start_copying(self, task_id: str) -> bool:
        with self._copies_lock:
            if task_id in self._copying:
                return False
            self._copying.add(task_id)
            return True

    def _stop_copying(self, task_id: str) -> None:
        with self._copies_lock:
            self._copying.discard(task_id)

    # -- following a task ------------------------------------------------------------------

    def _wait_in_line(self, record: TaskRecord) -> Following | None:
        """A task just queued here: its caller waits here, and the dispatcher looks at once."""
        following = self.waiting.in_line(record)
        self.queue.wake()
        return following

    def _take_turn(self, record: TaskRecord) -> None:
        """The dispatcher took this task's turn: submit it, apart from the dispatcher (a hung submission must hold
        up nobody). A process that is stopping puts it back, for another to submit."""
        self.waited_in_queue(time.time() - record.created_at)
        following = self.waiting.own(record)
        if following is None or not self.background.spawn(self._submit, following):
            log.info("task %s goes back to the queue: this process is stopping", record.task_id)
            self._quietly(self.store.requeue, record.task_id, self.follower_id)

    def _take_over(self, record: TaskRecord) -> None:
        """Follow a task whose follower is gone; it may have ended long ago, so ask at once. A task whose turn
        was taken but whose submission never started goes back to the queue instead."""
        if record.upstream_task_id is None and record.key_id is not None and record.sending_at is None:
            log.info("task %s goes back to the queue: its turn was taken, and it was never sent", record.task_id)
            self._quietly(self.store.requeue, record.task_id, self.follower_id)
            self.queue.wake()
            return
        following = self.waiting.own(record)
        if following is not None:  # one whose submission's answer was lost waits for its callback, if any
            self.polls.add(following, time.time() if record.upstream_task_id else self._next_ask(record))

    def _submit(self, following: Following) -> None:
        record = following.record = replace(following.record, sending_at=time.time())
        marked = self._until_stored(self.store.sending, record.task_id, self.follower_id, record.sending_at)
        if not marked:  # not sent: it went back to the queue meanwhile (False), or this process is stopping (None)
            if marked is False:
                self.waiting.watch(following, replace(record, sending_at=None))
            return
        try:
            task = self._send(record)
        except (UpstreamBusy, KeyRefused) as not_now:
            self._back_in_line(following, not_now)
            return
        except NanoBananaError as failure:
            if not isinstance(failure, SubmissionUncertain):
                self._refused(following, failure)
                return
            log.warning("task %s: the submission went unanswered; it may have been made", record.task_id)
            following.record = replace(record, error_message=failure.message)
        except Exception:
            log.exception("submitting task %s failed unexpectedly; it may have been made", record.task_id)
        else:
            self.queue.went_through(record.key_id)
            key_id = self.client.keys.key_id(task.key_number)
            following.record = replace(
                record, upstream_task_id=task.task_id, key_id=key_id, submitted_at=task.submitted_at
            )
            self._quietly(self.store.submitted, record.task_id, task.task_id, key_id, task.submitted_at)
        self.polls.add(following, self._next_ask(following.record))

    def _send(self, record: TaskRecord) -> Task:
        """Submit with the key the task's turn was taken with; once answered, the key's window knows when it went
        (a turn taken counts as sent as late as it could be until then), and the queue looks again."""
        number = self.client.keys.number_of(record.key_id)
        try:
            return self.client.submit(generation_of(record), self._callback_url(record), number or 0)
        finally:
            if self.settings.pacing.rate is not None and record.key_id is not None:
                self._quietly(self.store.sent, record.task_id, record.key_id, time.time())
                self.queue.wake()

    def _back_in_line(self, following: Following, not_now: UpstreamBusy | KeyRefused) -> None:
        """Nothing was made: the task goes back to its turn. After a busy answer its key rests a while; with every
        key refused, the caller hears why at once."""
        record = following.record
        if isinstance(not_now, KeyRefused):
            try:
                self.client.first_usable_key()
            except UpstreamUnavailable as no_key_left:
                self._refused(following, no_key_left)
                return
        busy = isinstance(not_now, UpstreamBusy)
        hold = self.queue.hold_after_busy(record.key_id, not_now.retry_after) if busy else None
        log.info("task %s goes back to the queue: %s", record.task_id, not_now.message)
        self.waiting.watch(
            following, replace(record, state=TaskState.QUEUED, key_id=None, follower="", sending_at=None)
        )
        if self._until_stored(self.store.requeue, record.task_id, self.follower_id, hold) is False:
            log.warning("task %s could not go back to the queue: it is no longer this process's", record.task_id)
        self.queue.wake()

    def _refused(self, following: Following, failure: NanoBananaError) -> None:
        """Nothing was made: the caller hears why (and may use its idempotency key again, see nothing_made)."""
        following.refusal = failure
        self._finish(following, settled(following.record, TaskState.FAILED, failure.code, failure.message))

    def _stranded(self, record: TaskRecord) -> None:
        """A turn this process took long ago and never started to send (its work was lost): back to the queue.
        Should its submission still come, it finds the task no longer this process's, and does not send it."""
        log.warning("task %s goes back to the queue: its turn was taken here and never used", record.task_id)
        self._quietly(self.store.requeue, record.task_id, self.follower_id)
        self.queue.wake()

    def _queued_too_long(self, record: TaskRecord) -> None:
        """QUEUE_MAX_WAIT passed in the queue: the task fails, nothing paid (its idempotency key is free again)."""
        self._end_queued(record, TaskState.FAILED, "upstream_unavailable", QUEUED_TOO_LONG_MESSAGE)

    def _end_queued(self, record: TaskRecord, state: str, code: str, message: str) -> TaskRecord | None:
        """End a task that is still queued; None if it has left the queue meanwhile."""
        stored = self.store.end_queued(settled(record, state, code, message))
        if stored is not None:
            self.waiting.adopt(stored)
            self._quietly(self.store.notify, record.task_id)
        return stored

    def _usable_key_ids(self) -> list[str]:
        return [self.client.keys.key_id(number) for number, _ in self.client.keys.usable()]

    def _next_ask(self, record: TaskRecord) -> float:
        """When to ask about the task next. Without an upstream id, that is when to stop hoping for its callback."""
        if record.upstream_task_id is not None:
            return self.client.next_poll(record.submitted_at or record.created_at, time.time())
        if not self.settings.callbacks:
            return time.time()
        sent = record.sending_at or record.created_at
        return sent + self.settings.polling_window + self.settings.submit_read_timeout

    def _when_due(self, item: Following | Watch) -> None:
        if isinstance(item, Watch):
            self.waiting.look_again(item.following)
        else:
            self._ask_when_due(item)

    def _ask_when_due(self, following: Following) -> None:
        """The task's turn has come in the poll schedule: ask the upstream, then end the task or ask again later."""
        record = following.record
        try:
            end = self._end_if_known(record)
        except Exception:
            log.exception("asking about task %s failed unexpectedly; asking again later", record.task_id)
            end = None
        if following.ended.is_set():
            return  # a callback ended it meanwhile
        if end is not None and self._needs_copies(end):
            if not self._start_copying(record.task_id):  # a callback or a status read is copying it: it ends there
                self.polls.add(following, self._next_ask(record))
                return
            try:
                end = self._with_copies(end)
            finally:
                self._stop_copying(record.task_id)
        if end is not None:
            self._finish(following, end)
        elif time.time() >= record.created_at + TASK_TTL:
            self._finish(following, settled(record, TaskState.FAILED, "upstream_error", GIVEN_UP_MESSAGE))
        else:
            self.polls.add(following, self._next_ask(record))

    def _end_if_known(self, record: TaskRecord) -> TaskRecord | None:
        if record.upstream_task_id is None:  # the submission's answer was lost, and no callback came
            message = record.error_message or UNCONFIRMED_MESSAGE
            return settled(record, TaskState.UNCONFIRMED, "upstream_error", message)
        task = self._upstream_task(record)
        if task is None:
            return settled(record, TaskState.FAILED, "upstream_error", KEY_GONE_MESSAGE)
        status = self._ask(task)
        return ended(record, status) if status.done else None

    # -- ending a task -----------------------------------------------------------------------

    def _finish(self, following: Following, end: TaskRecord) -> None:
        """Record the end, then answer whoever waits. With the store away, answer now and record it when back."""
        following.record = end
        try:
            following.record = self.store.complete_task(end)
        except StoreUnavailable:
            log.warning("the store is unavailable: the end of task %s is recorded when it is back", end.task_id)
            self.waiting.release(following)
            following.record = self._record_when_back(end)
        self.waiting.release(following)
        self._quietly(self.store.notify, end.task_id)
        self.queue.task_ended()

    def _record_when_back(self, end: TaskRecord) -> TaskRecord:
        recorded = self._until_stored(self.store.complete_task, end)
        if recorded is None:
            return end
        log.info("recorded the end of task %s now that the store is back", end.task_id)
        return recorded

    def _until_stored(self, write, *args):
        """A store write that must happen: tried again, further and further apart, while the store is away."""
        pause = 0.5
        while True:
            try:
                return write(*args)
            except StoreUnavailable:
                if self.background.stopping.wait(pause):
                    return None
                pause = min(pause * 2, RECORD_RETRY_MAX)

    def _record_end(self, end: TaskRecord) -> TaskRecord:
        """Record an end learnt from a callback or a status request; whoever follows or waits learns it too."""
        recorded = self.store.complete_task(end)
        self.waiting.adopt(recorded)
        self._quietly(self.store.notify, end.task_id)
        return recorded

    # -- small helpers -------------------------------------------------------------------------

    def _with_copies(self, end: TaskRecord) -> TaskRecord:
        """A success whose pictures are copied to the media store, before anyone is answered or it is remembered."""
        if self.media is None or end.state != TaskState.SUCCESS:
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
                return TaskStatus(TaskState.FAILED, error_message=LOST_TASK_MESSAGE)
            return PENDING
        except NanoBananaError as failure:
            log.info("status of task %s unknown: %s", task.task_id, failure.message)
            return PENDING

    def _callback_url(self, record: TaskRecord) -> str:
        """Where the upstream is to call back: our receiver, with the task's secret (or a placeholder)."""
        if record.callback_secret is None:
            return CALLBACK_PLACEHOLDER
        return (
            f"{self.settings.public_base_url}/nanobanana/callback?task={record.task_id}&secret={record.callback_secret}"
        )

    @staticmethod
    def _quietly(action, *args):
        """A store call that may wait for better times (the end of the task writes the record whole); None then."""
        try:
            return action(*args)
        except StoreUnavailable:
            log.warning("the store is unavailable: %s skipped for now", action.__name__)
            return None


def nothing_made(record: TaskRecord) -> bool:
    """The task failed without an upstream task: refused at submission, or never sent (queued too long, no key)."""
    return record.state == TaskState.FAILED and record.upstream_task_id is None


def generation_of(record: TaskRecord) -> Generation:
    """What a recorded task asks the upstream to make."""
    return Generation(
        prompt=record.prompt or "",
        model=record.model,
        image_urls=record.source_image_urls,
        aspect_ratio=record.aspect_ratio,
        resolution=record.resolution,
        num_images=record.num_images,
    )


def ended(record: TaskRecord, status: TaskStatus, **found) -> TaskRecord:
    """The record with the end the upstream reported (and anything else `found` meanwhile)."""
    code = None if status.state == TaskState.SUCCESS else "generation_failed"
    pictures = {"image_urls": status.image_urls, "upstream_image_urls": status.image_urls}
    return settled(record, status.state, code, status.error_message, **pictures, **found)


def settled(record: TaskRecord, state: str, error_code: str | None, message: str | None, **found) -> TaskRecord:
    """The record as it ended; its delivery, if it has somewhere to go, is due from now. One copy of the
    record is made: with 27 fields, each copy costs about 9 µs, and every generation ends once."""
    now = time.time()
    changes = {"state": state, "error_code": error_code, "error_message": message, "completed_at": now, **found}
    if record.deliver_to is not None:
        changes.update(delivery_due(record.task_id, state, now))
    return replace(record, **changes)


def genuine(record: TaskRecord, secret: str, upstream_task_id: str) -> bool:
    """A callback is the upstream's if it carries the task's secret, for the task it names."""
    if not record.callback_secret or record.upstream_task_id not in (None, upstream_task_id):
        return False
    return hmac.compare_digest(secret.encode("utf-8", "surrogatepass"), record.callback_secret.encode())


def idempotency_key(wanted: GenerationRequest, owner: str) -> IdempotencyKey | None:
    """The caller's key within its owner's keys, and a digest of what it asked for (the wait aside)."""
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
