"""The shared store: Redis, when REDIS_URL is set, for several workers and instances.

Every rule that must hold when two processes race (recording with an idempotency key, completing
a task with the ordering rule, forgetting, taking over) is one Lua script, so Redis runs it whole.
Keys expire by themselves (tasks after a day, users after HISTORY_TTL); nothing needs purging.
"""

from __future__ import annotations

import json
import string
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, replace

import redis

from config import IDEMPOTENCY_TTL, TASK_TTL, Pacing
from errors import IdempotencyConflict, QueueFull, StoreUnavailable
from stores.records import (
    CHAIN_LENGTH,
    CHANNEL_MARK,
    FOLLOWER_LEASE,
    DeliveryState,
    IdempotencyKey,
    Picture,
    TaskRecord,
    TaskState,
    Turns,
    task_fields,
    task_record,
)
from stores.wakeups import Waiters

LUA_STATES = {
    "queued": TaskState.QUEUED,
    "pending": TaskState.PENDING,
    "success": TaskState.SUCCESS,
    "unconfirmed": TaskState.UNCONFIRMED,
    "delivery_pending": DeliveryState.PENDING,
}
# A greenlet holds a connection for one round trip, so a few dozen serve thousands of waiting
# requests; past the limit a caller waits for a free one (it never fails with "Too many connections").
POOL_SIZE = 100
CONNECTION_WAIT = 5.0  # seconds a caller waits for a free connection before the store counts as away
# A conversation is ended by purge() up to this long (and at most a tenth of HISTORY_TTL) before Redis would
# expire it, so that its pictures are still there to name: purges come once a minute.
EXPIRE_AHEAD = 120.0
PURGE_BATCH = 10_000  # conversations ended by one purge
SCHEMA_VERSION = 1  # 1: chats' conversations and tasks carry CHANNEL_MARK
# Redis answers a write it cannot take with these errors: the store is away for writes, not the service broken
REFUSING_WRITES = ("MISCONF", "OOM", "READONLY", "LOADING", "BUSY", "NOREPLICAS")
# The queue is a sorted set of members of one score, so in the order of their text: turn, then sequence.
QUEUE_MEMBER = "%015d:%015d:%s"  # turn, sequence, task id; the same format in Lua's string.format
_QUEUE_MEMBER_LUA = (
    f"local function queue_member(turn, sequence, id) return string.format('{QUEUE_MEMBER}', turn, sequence, id) end"
)

# KEYS: task, sequence counter, followers, idempotency key (or the task again); ARGV: prefix, task id,
# follower, first lease's end, keyed ("1"/""), fingerprint, task TTL, key TTL, queue max ("": none), then the
# task's fields. Returns the task id, the sequence (or the earlier task's fingerprint) and the turn; "" when full.
_RECORD = """
local earlier = ARGV[5] == '1' and redis.call('HMGET', KEYS[4], 'task_id', 'fingerprint') or {}
if earlier[1] and redis.call('EXISTS', ARGV[1] .. 'task:' .. earlier[1]) == 1 then
    return {earlier[1], earlier[2], '0'}
end
if ARGV[9] ~= '' and redis.call('ZCARD', ARGV[1] .. 'queue') >= tonumber(ARGV[9]) then return {'', '', ''} end
if ARGV[5] == '1' then
    redis.call('HSET', KEYS[4], 'task_id', ARGV[2], 'fingerprint', ARGV[6])
    redis.call('EXPIRE', KEYS[4], ARGV[8])
end
local sequence = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'sequence', sequence, unpack(ARGV, 10))
redis.call('EXPIRE', KEYS[1], ARGV[7])
local turn = 0
local queued = redis.call('HMGET', KEYS[1], 'state', 'lane', 'created_at')
if queued[1] == '$queued' then
    -- the lane's next turn: right after its last one still queued, never before the turn the queue has reached
    local lane = ARGV[1] .. 'lane:' .. queued[2]
    turn = tonumber(redis.call('GET', ARGV[1] .. 'turn')) or 0
    local last = redis.call('ZRANGE', lane, -1, -1, 'WITHSCORES')
    if last[2] and tonumber(last[2]) + 1 > turn then turn = tonumber(last[2]) + 1 end
    redis.call('ZADD', lane, turn, ARGV[2])
    redis.call('EXPIRE', lane, ARGV[7])
    redis.call('HSET', KEYS[1], 'turn', turn)
    redis.call('ZADD', ARGV[1] .. 'queue', 0, queue_member(turn, sequence, ARGV[2]))
    redis.call('ZADD', ARGV[1] .. 'queued_at', queued[3], ARGV[2])
end
-- a follower new to the followers set gets a first lease; a known one keeps its own
redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[3])
redis.call('SADD', ARGV[1] .. 'following:' .. ARGV[3], ARGV[2])
return {ARGV[2], tostring(sequence), tostring(turn)}
"""
# KEYS: task; ARGV: prefix, history TTL, task TTL, now, the picture (JSON; "" unless a success), chain length,
# then the ended task's field/value pairs. Written whole: a task whose record Redis lost (a restart without
# persistence) comes back.
_COMPLETE = """
local stored = redis.call('HMGET', KEYS[1], 'state', 'follower')
if stored[1] and stored[1] ~= '$pending' and stored[1] ~= '$unconfirmed' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[3])
local task = redis.call('HMGET', KEYS[1], 'task_id', 'follower', 'state', 'conversation', 'sequence',
                        'upstream_task_id', 'key_id')
if stored[2] then
    redis.call('SREM', ARGV[1] .. 'following:' .. stored[2], task[1])
    redis.call('ZREM', ARGV[1] .. 'unsent:' .. stored[2], task[1])
end
if task[7] and task[7] ~= '' then redis.call('ZREM', ARGV[1] .. 'running:' .. task[7], task[1]) end
redis.call('SREM', ARGV[1] .. 'following:' .. task[2], task[1])
if task[6] and task[6] ~= '' then
    redis.call('SET', ARGV[1] .. 'upstream:' .. task[6], task[1], 'EX', ARGV[3])
end
local webhook = redis.call('HMGET', KEYS[1], 'webhook_state', 'webhook_due')
if webhook[1] == '$delivery_pending' then redis.call('ZADD', ARGV[1] .. 'webhooks', webhook[2], task[1]) end
if task[3] == '$success' and task[4] and task[4] ~= '' and ARGV[5] ~= '' then
    local user_key, chain_key = ARGV[1] .. 'user:' .. task[4], ARGV[1] .. 'chain:' .. task[4]
    local forgotten_before = tonumber(redis.call('HGET', user_key, 'forgotten_before')) or -1
    if tonumber(task[5]) > forgotten_before then
        redis.call('ZADD', chain_key, task[5], ARGV[5])
        redis.call('ZREMRANGEBYRANK', chain_key, 0, -(tonumber(ARGV[6]) + 1))
        redis.call('HSET', user_key, 'forgotten_before', forgotten_before, 'updated_at', ARGV[4])
        redis.call('EXPIRE', user_key, ARGV[2])
        redis.call('EXPIRE', chain_key, ARGV[2])
        redis.call('ZADD', ARGV[1] .. 'expiring', ARGV[4] + ARGV[2], task[4])
    end
end
return 1
"""
# KEYS: task, upstream id's alias; ARGV: upstream id, key id, submitted at, task id, TTL
_SUBMITTED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end  -- lost with the store: the end writes it whole
redis.call('HSET', KEYS[1], 'upstream_task_id', ARGV[1], 'key_id', ARGV[2], 'submitted_at', ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
return 1
"""
# KEYS: queue, turn reached, followers; ARGV: prefix, follower, now, rate ("" off), spacing, max running ("" off),
# limit, first lease's end, task TTL, longest submission, then the usable key ids.
# Returns the tasks taken (each its hash, read in the script: none is taken without being handed over), when a key
# next allows one, and how many are left queued.
_TAKE_TURNS = """
local prefix, follower, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rate, spacing, max_running, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function allowances()
    local keys, allowance, next_chance = {}, {}, nil
    local function sooner(moment) if next_chance == nil or moment < next_chance then next_chance = moment end end
    for i = 11, #ARGV do
        local key_id, left = ARGV[i], limit
        local held = tonumber(redis.call('GET', prefix .. 'hold:' .. key_id))
        if held and held > now then
            sooner(held)
            left = 0
        else
            if rate then
                local pace = prefix .. 'pace:' .. key_id
                redis.call('ZREMRANGEBYSCORE', pace, '-inf', now - spacing)
                local count = redis.call('ZCARD', pace)
                if count >= rate then
                    local opening = redis.call('ZRANGE', pace, count - rate, count - rate, 'WITHSCORES')
                    sooner(tonumber(opening[2]) + spacing)
                end
                left = math.min(left, rate - count)
            end
            if max_running then
                local running = prefix .. 'running:' .. key_id
                redis.call('ZREMRANGEBYSCORE', running, '-inf', now - tonumber(ARGV[9]))
                left = math.min(left, max_running - redis.call('ZCARD', running))
            end
        end
        if left > 0 then table.insert(keys, key_id); allowance[key_id] = left end
    end
    return keys, allowance, next_chance
end
local keys, allowance, next_chance = allowances()
local taken, reached, k = {}, tonumber(redis.call('GET', KEYS[2])) or 0, 0
local members = #keys > 0 and redis.call('ZRANGE', KEYS[1], 0, limit - 1) or {}
for _, member in ipairs(members) do
    local chosen = nil
    for _ = 1, #keys do
        k = k % #keys + 1
        if allowance[keys[k]] > 0 then chosen = keys[k]; break end
    end
    if not chosen then break end
    local id = string.sub(member, 33)  -- after the turn and the sequence (QUEUE_MEMBER)
    local task = prefix .. 'task:' .. id
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', prefix .. 'queued_at', id)
    local stored = redis.call('HMGET', task, 'state', 'turn', 'follower', 'lane')
    if stored[4] then redis.call('ZREM', prefix .. 'lane:' .. stored[4], id) end
    if stored[1] == '$queued' then
        allowance[chosen] = allowance[chosen] - 1
        if stored[3] and stored[3] ~= '' then redis.call('SREM', prefix .. 'following:' .. stored[3], id) end
        redis.call('HSET', task, 'state', '$pending', 'follower', follower, 'key_id', chosen, 'taken_at', ARGV[3])
        redis.call('SADD', prefix .. 'following:' .. follower, id)
        redis.call('ZADD', prefix .. 'unsent:' .. follower, now, id)
        redis.call('EXPIRE', prefix .. 'unsent:' .. follower, ARGV[9])
        redis.call('ZADD', prefix .. 'running:' .. chosen, now, id)
        if rate then
            redis.call('ZADD', prefix .. 'pace:' .. chosen, now + tonumber(ARGV[10]), id)
            redis.call('EXPIRE', prefix .. 'pace:' .. chosen, math.ceil(spacing + tonumber(ARGV[10])) + 1)
        end
        reached = math.max(reached, tonumber(stored[2]))
        table.insert(taken, redis.call('HGETALL', task))
    end
end
if #taken > 0 then
    redis.call('SET', KEYS[2], reached)
    redis.call('ZADD', KEYS[3], 'NX', ARGV[8], follower)
    keys, allowance, next_chance = allowances()
end
return {taken, next_chance and tostring(next_chance) or '', redis.call('ZCARD', KEYS[1])}
"""
# KEYS: task, queue, queued_at; ARGV: prefix, task id, key held until ("" not held), milliseconds it is held,
# follower
_REQUEUE = """
local t = redis.call('HMGET', KEYS[1], 'state', 'upstream_task_id', 'key_id', 'follower', 'turn', 'sequence',
                     'created_at', 'lane')
if t[1] ~= '$pending' or (t[2] and t[2] ~= '') or t[4] ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'state', '$queued', 'key_id', '', 'follower', '', 'sending_at', '')
if t[8] then redis.call('ZADD', ARGV[1] .. 'lane:' .. t[8], t[5], ARGV[2]) end
if t[3] and t[3] ~= '' then
    redis.call('ZREM', ARGV[1] .. 'running:' .. t[3], ARGV[2])
    if ARGV[3] ~= '' then redis.call('SET', ARGV[1] .. 'hold:' .. t[3], ARGV[3], 'PX', ARGV[4]) end
end
if t[4] and t[4] ~= '' then
    redis.call('SREM', ARGV[1] .. 'following:' .. t[4], ARGV[2])
    redis.call('ZREM', ARGV[1] .. 'unsent:' .. t[4], ARGV[2])
end
redis.call('ZADD', KEYS[2], 0, queue_member(tonumber(t[5]), tonumber(t[6]), ARGV[2]))
redis.call('ZADD', KEYS[3], t[7], ARGV[2])
return 1
"""
# KEYS: task, queue, queued_at, webhooks; ARGV: prefix, task id, then the ended task's field/value pairs
_END_QUEUED = """
local t = redis.call('HMGET', KEYS[1], 'state', 'turn', 'sequence', 'follower', 'lane')
if t[1] ~= '$queued' then return 0 end
redis.call('ZREM', KEYS[2], queue_member(tonumber(t[2]), tonumber(t[3]), ARGV[2]))
redis.call('ZREM', KEYS[3], ARGV[2])
if t[4] and t[4] ~= '' then redis.call('SREM', ARGV[1] .. 'following:' .. t[4], ARGV[2]) end
if t[5] then redis.call('ZREM', ARGV[1] .. 'lane:' .. t[5], ARGV[2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
local webhook = redis.call('HMGET', KEYS[1], 'webhook_state', 'webhook_due')
if webhook[1] == '$delivery_pending' then redis.call('ZADD', KEYS[4], webhook[2], ARGV[2]) end
return 1
"""
# KEYS: task, the follower's unsent tasks; ARGV: when the submission is about to go, follower, task id
_SENDING = """
local t = redis.call('HMGET', KEYS[1], 'state', 'follower', 'upstream_task_id')
if t[1] ~= '$pending' or t[2] ~= ARGV[2] or (t[3] and t[3] ~= '') then return 0 end
redis.call('HSET', KEYS[1], 'sending_at', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""
# KEYS: idempotency key; ARGV: task id. The key is let go only if it still names that task.
_RELEASE_KEY = """
if redis.call('HGET', KEYS[1], 'task_id') == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""
# KEYS: webhooks (a sorted set of task ids by when they are due); ARGV: prefix, now, lease end, limit
_DUE_DELIVERIES = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(due) do
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    redis.call('HSET', ARGV[1] .. 'task:' .. id, 'webhook_due', ARGV[3])
end
return due
"""
# KEYS: task, webhooks; ARGV: task id, webhook id, state, attempts, due
_DELIVERY_ATTEMPTED = """
if redis.call('HGET', KEYS[1], 'webhook_id') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'webhook_state', ARGV[3], 'webhook_attempts', ARGV[4], 'webhook_due', ARGV[5])
if ARGV[3] == '$delivery_pending' then
    redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
else
    redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"""
# KEYS: user, chain, sequence counter, expiring; ARGV: now, history TTL, conversation. Returns the pictures dropped.
_FORGET = """
local dropped = redis.call('ZRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[3])
redis.call('HSET', KEYS[1], 'forgotten_before', tonumber(redis.call('GET', KEYS[3])) or 0, 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return dropped
"""
# KEYS: user, chain, expiring; ARGV: now, history TTL, conversation. Returns the picture dropped, or nil.
_UNDO = """
local last = redis.call('ZPOPMAX', KEYS[2])
if #last == 0 then return nil end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1] + ARGV[2], ARGV[3])
return last[1]
"""
# Uploads whose time ran out, taken and forgotten in one step: each named to one process, once.
_EXPIRE_UPLOADS = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""

# KEYS: expiring (conversations by when they expire); ARGV: prefix, until, limit. Ends the conversations that
# expire by `until` a little before Redis would, so that their pictures are known; returns those pictures.
_EXPIRE = """
local dropped = {}
for _, conversation in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))) do
    local chain_key = ARGV[1] .. 'chain:' .. conversation
    for _, entry in ipairs(redis.call('ZRANGE', chain_key, 0, -1)) do table.insert(dropped, entry) end
    redis.call('DEL', chain_key, ARGV[1] .. 'user:' .. conversation)
    redis.call('ZREM', KEYS[1], conversation)
end
return dropped
"""
# KEYS: expiring; ARGV: prefix, old start, mark, history TTL. Moves the conversations whose name starts with the
# old start to the marked name (a chat's conversation, before chats had a namespace of their own).
_MARK_CHATS = """
local moved = 0
for _, conversation in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if string.sub(conversation, 1, #ARGV[2]) == ARGV[2] then
        local marked = ARGV[3] .. conversation
        for _, kind in ipairs({'chain:', 'user:'}) do
            local old, new = ARGV[1] .. kind .. conversation, ARGV[1] .. kind .. marked
            if redis.call('EXISTS', old) == 1 then
                if redis.call('EXISTS', new) == 0 then
                    redis.call('RENAME', old, new)
                else  -- a picture came under the new name meanwhile: keep both chains, and the new user entry
                    if kind == 'chain:' then redis.call('ZUNIONSTORE', new, 2, new, old) end
                    redis.call('DEL', old)
                    redis.call('EXPIRE', new, ARGV[4])
                end
            end
        end
        redis.call('ZADD', KEYS[1], redis.call('ZSCORE', KEYS[1], conversation), marked)
        redis.call('ZREM', KEYS[1], conversation)
        moved = moved + 1
    end
end
return moved
"""
# KEYS: followers; ARGV: prefix, taker, now, limit. Moves tasks of followers whose lease ran out.
_TAKE_OVER = """
local taken = {}
local limit = tonumber(ARGV[4])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3], 'LIMIT', 0, 20)
for _, follower in ipairs(lapsed) do
    if follower ~= ARGV[2] and #taken < limit then
        local set = ARGV[1] .. 'following:' .. follower
        for _, id in ipairs(redis.call('SPOP', set, limit - #taken)) do
            local key = ARGV[1] .. 'task:' .. id
            if redis.call('HGET', key, 'state') == '$pending' then
                redis.call('HSET', key, 'follower', ARGV[2])
                redis.call('SADD', ARGV[1] .. 'following:' .. ARGV[2], id)
                table.insert(taken, id)
            end
        end
        if redis.call('SCARD', set) == 0 then redis.call('ZREM', KEYS[1], follower) end
    end
end
return taken
"""


class RedisStore:
    """The same store in Redis: every worker and instance sees the same users, tasks and followers."""

    def __init__(self, url: str, history_ttl: int, prefix: str = "nanobanana:", clock: Callable[[], float] = time.time):
        self.history_ttl = history_ttl
        self.prefix = prefix
        self.clock = clock
        self.pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=CONNECTION_WAIT,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=2,
            health_check_interval=30,
        )
        # The pool's connections never send a command twice (redis-py's default): a script run again after a lost
        # answer would do its work twice (taking turns: other tasks as well, the first ones handed to nobody).
        self.redis = redis.Redis(connection_pool=self.pool)
        self._record = self._script(_RECORD)
        self._submitted = self._script(_SUBMITTED)
        self._complete = self._script(_COMPLETE)
        self._forget = self._script(_FORGET)
        self._undo = self._script(_UNDO)
        self._expire = self._script(_EXPIRE)
        self._expire_uploads = self.redis.register_script(_EXPIRE_UPLOADS)
        self._take_over = self._script(_TAKE_OVER)
        self._due_deliveries = self._script(_DUE_DELIVERIES)
        self._delivery_attempted = self._script(_DELIVERY_ATTEMPTED)
        self._take_turns = self._script(_TAKE_TURNS)
        self._requeue = self._script(_REQUEUE)
        self._end_queued = self._script(_END_QUEUED)
        self._sending = self._script(_SENDING)
        self._release_key = self._script(_RELEASE_KEY)
        self._mark_chats = self._script(_MARK_CHATS)
        self._up_to_date = False
        self._waiters = Waiters()
        self._subscriber: threading.Thread | None = None
        self._subscriber_lock = threading.Lock()
        self._closed = threading.Event()

    # -- conversations ---------------------------------------------------------------------

    def last_picture(self, conversation: str) -> Picture | None:
        last = self._call(self.redis.zrange, self._key("chain:", conversation), -1, -1)
        return _picture(last[0]) if last else None

    def chain(self, conversation: str) -> list[Picture]:
        return [_picture(entry) for entry in self._call(self.redis.zrange, self._key("chain:", conversation), 0, -1)]

    def undo(self, conversation: str) -> Picture | None:
        keys = [self._key("user:", conversation), self._key("chain:", conversation), self._key("expiring")]
        dropped = self._call(self._undo, keys=keys, args=[self.clock(), self.history_ttl, conversation])
        return _picture(dropped) if dropped else None

    def forget(self, conversation: str) -> list[Picture]:
        keys = [self._key("user:", conversation), self._key("chain:", conversation), self._key("sequence")]
        keys.append(self._key("expiring"))
        args = [self.clock(), self.history_ttl, conversation]
        return [_picture(entry) for entry in self._call(self._forget, keys=keys, args=args)]

    # -- the ledger ------------------------------------------------------------------------

    def record_task(
        self, record: TaskRecord, key: IdempotencyKey | None = None, queue_max: int | None = None
    ) -> tuple[TaskRecord, bool]:
        task_key = self._key("task:", record.task_id)
        keys = [
            task_key,
            self._key("sequence"),
            self._key("followers"),
            self._key("idem:", key.scope) if key else task_key,
        ]
        values = task_fields(record)
        del values["sequence"]
        args = [self.prefix, record.task_id, record.follower, self.clock() + FOLLOWER_LEASE, "1" if key else ""]
        args += [key.fingerprint if key else "", TASK_TTL, IDEMPOTENCY_TTL, "" if queue_max is None else queue_max]
        task_id, detail, turn = self._call(self._record, keys=keys, args=[*args, *_pairs(values)])
        if not task_id:
            raise QueueFull()
        if task_id == record.task_id:
            return replace(record, sequence=int(detail), turn=int(turn)), True
        if key is None or detail != key.fingerprint:
            raise IdempotencyConflict()
        earlier = self.task(task_id)
        if earlier is None:  # expired between the script and this read: nothing was made twice
            raise StoreUnavailable("the task of this idempotency key just expired")
        return earlier, False

    def keyed_task(self, key: IdempotencyKey) -> TaskRecord | None:
        task_id, fingerprint = self._call(self.redis.hmget, self._key("idem:", key.scope), "task_id", "fingerprint")
        earlier = self.task(task_id) if task_id else None
        if earlier is not None and fingerprint != key.fingerprint:
            raise IdempotencyConflict()
        return earlier

    def task(self, task_id: str) -> TaskRecord | None:
        fields = self._call(self.redis.hgetall, self._key("task:", task_id))
        if not fields:
            ours = self._call(self.redis.get, self._key("upstream:", task_id))
            fields = self._call(self.redis.hgetall, self._key("task:", ours)) if ours else {}
        return _task_record(fields) if fields else None

    def submitted(self, task_id: str, upstream_task_id: str, key_id: str, submitted_at: float) -> None:
        keys = [self._key("task:", task_id), self._key("upstream:", upstream_task_id)]
        self._call(self._submitted, keys=keys, args=[upstream_task_id, key_id, submitted_at, task_id, TASK_TTL])

    def complete_task(self, record: TaskRecord) -> TaskRecord:
        now = self.clock()
        picture = json.dumps(asdict(Picture.of(record, now))) if record.state == TaskState.SUCCESS else ""
        args = [self.prefix, self.history_ttl, TASK_TTL, now, picture, CHAIN_LENGTH, *_pairs(task_fields(record))]
        self._call(self._complete, keys=[self._key("task:", record.task_id)], args=args)
        return self.task(record.task_id) or record

    def release_key(self, key: IdempotencyKey, task_id: str) -> None:
        self._call(self._release_key, keys=[self._key("idem:", key.scope)], args=[task_id])

    def claim_poll(self, task_id: str, interval: float) -> bool:
        key, milliseconds = self._key("polled:", task_id), max(1, int(interval * 1000))
        return bool(self._call(self.redis.set, key, 1, px=milliseconds, nx=True))

    def first_time(self, key: str, ttl: float) -> bool:
        return bool(self._call(self.redis.set, self._key("seen:", key), 1, nx=True, px=max(1, int(ttl * 1000))))

    def keep_upload(self, url: str, until: float) -> None:
        self._call(self.redis.zadd, self._key("uploads"), {url: until})

    def renew_upload(self, url: str, until: float) -> None:
        self._call(self.redis.zadd, self._key("uploads"), {url: until}, xx=True)

    def expired_uploads(self, now: float, limit: int) -> list[str]:
        return self._call(self._expire_uploads, keys=[self._key("uploads")], args=[now, limit])

    # -- the queue ---------------------------------------------------------------------------

    def take_turns(self, follower: str, now: float, pacing: Pacing, key_ids: list[str], limit: int) -> Turns:
        keys = [self._key("queue"), self._key("turn"), self._key("followers")]
        off = ""
        args = [self.prefix, follower, repr(now), off if pacing.rate is None else pacing.rate, pacing.spacing]
        args += [off if pacing.max_running is None else pacing.max_running, limit, now + FOLLOWER_LEASE, TASK_TTL]
        args.append(pacing.longest_submission)
        taken, next_chance, left = self._call(self._take_turns, keys=keys, args=[*args, *key_ids])
        records = [_task_record(dict(zip(flat[::2], flat[1::2], strict=True))) for flat in taken]
        return Turns(records, float(next_chance) if next_chance else None, left > 0)

    def sending(self, task_id: str, follower: str, at: float) -> bool:
        keys = [self._key("task:", task_id), self._key("unsent:", follower)]
        return bool(self._call(self._sending, keys=keys, args=[at, follower, task_id]))

    def unsent(self, follower: str, taken_before: float, limit: int) -> list[TaskRecord]:
        ids = self._call(
            self.redis.zrangebyscore, self._key("unsent:", follower), "-inf", f"({taken_before!r}", 0, limit
        )
        records = self._records(ids)
        return [r for r in records if r.state == TaskState.PENDING and r.follower == follower and not r.sending_at]

    def sent(self, task_id: str, key_id: str, at: float) -> None:
        self._call(self.redis.zadd, self._key("pace:", key_id), {task_id: at}, xx=True, lt=True)

    def requeue(self, task_id: str, follower: str, hold_key_until: float | None = None) -> bool:
        keys = [self._key("task:", task_id), self._key("queue"), self._key("queued_at")]
        held = "" if hold_key_until is None else hold_key_until
        milliseconds = 1 if hold_key_until is None else max(1, int((hold_key_until - self.clock()) * 1000))
        args = [self.prefix, task_id, held, milliseconds, follower]
        return bool(self._call(self._requeue, keys=keys, args=args))

    def end_queued(self, record: TaskRecord) -> TaskRecord | None:
        keys = [self._key("task:", record.task_id), self._key("queue"), self._key("queued_at"), self._key("webhooks")]
        values = task_fields(record)
        del values["sequence"], values["turn"]
        if not self._call(self._end_queued, keys=keys, args=[self.prefix, record.task_id, *_pairs(values)]):
            return None
        return self.task(record.task_id)

    def queued_before(self, created_before: float, limit: int) -> list[TaskRecord]:
        ids = self._call(self.redis.zrangebyscore, self._key("queued_at"), "-inf", f"({created_before!r}", 0, limit)
        return self._records(ids)

    def queue_position(self, record: TaskRecord) -> int | None:
        member = QUEUE_MEMBER % (record.turn, record.sequence, record.task_id)
        rank = self._call(self.redis.zrank, self._key("queue"), member)
        return None if rank is None else rank + 1

    def queue_depth(self) -> int:
        return self._call(self.redis.zcard, self._key("queue"))

    # -- webhooks to callers ------------------------------------------------------------------

    def due_deliveries(self, now: float, lease_until: float, limit: int) -> list[TaskRecord]:
        args = [self.prefix, now, lease_until, limit]
        due = self._call(self._due_deliveries, keys=[self._key("webhooks")], args=args)
        return self._records(due)

    def delivery_attempted(self, task_id: str, webhook_id: str, state: str, attempts: int, due: float | None) -> None:
        keys = [self._key("task:", task_id), self._key("webhooks")]
        args = [task_id, webhook_id, state, attempts, "" if due is None else due]
        self._call(self._delivery_attempted, keys=keys, args=args)

    # -- followers -------------------------------------------------------------------------

    def heartbeat(self, follower: str, alive_until: float) -> None:
        self._call(self.redis.zadd, self._key("followers"), {follower: alive_until})

    def take_over(self, follower: str, now: float, limit: int) -> list[TaskRecord]:
        args = [self.prefix, follower, now, limit]
        return self._records(self._call(self._take_over, keys=[self._key("followers")], args=args))

    def retire(self, follower: str) -> None:
        self._call(self.redis.zadd, self._key("followers"), {follower: 0})

    # -- wake-ups, health, housekeeping -----------------------------------------------------

    def listen(self, task_id: str) -> AbstractContextManager[threading.Event]:
        """An event set when any process calls `notify(task_id)`, while the block runs."""
        self._start_subscriber()
        return self._waiters.listen(task_id)

    def notify(self, task_id: str) -> None:
        """Wake whoever waits for this task, in every worker and instance (Redis pub/sub)."""
        self._call(self.redis.publish, self._key("wake"), task_id)

    def on_notify(self, callback: Callable[[str], None]) -> None:
        self._waiters.subscribe(callback)
        self._start_subscriber()

    def ping(self) -> bool:
        try:  # a write: Redis refuses them when it cannot save (MISCONF), is full (OOM) or is a replica
            return bool(self._call(self.redis.set, self._key("health"), 1, ex=60))
        except StoreUnavailable:
            return False

    def purge(self, now: float) -> list[Picture]:
        """Every key carries its own expiry; conversations about to expire are ended here, to name their pictures."""
        if not self._up_to_date:
            self._bring_up_to_date()
        args = [self.prefix, now + min(EXPIRE_AHEAD, self.history_ttl / 10), PURGE_BATCH]
        return [_picture(entry) for entry in self._call(self._expire, keys=[self._key("expiring")], args=args)]

    def _bring_up_to_date(self) -> None:
        """Once per database, what changed since it was written: chats' tasks, then their conversations, move to
        names no HTTP user id can spell (tasks first, so that a picture ending meanwhile lands under the new name)."""
        if int(self._call(self.redis.get, self._key("schema")) or 0) < SCHEMA_VERSION:
            tasks = self._call(lambda: list(self.redis.scan_iter(match=self._key("task:") + "*", count=1000)))
            for key in tasks:
                owner, conversation = self._call(self.redis.hmget, key, "owner", "conversation")
                if owner == "telegram" and conversation:  # queued ones keep their lane: only the order uses it
                    marked = {"owner": CHANNEL_MARK + owner, "conversation": CHANNEL_MARK + conversation}
                    self._call(self.redis.hset, key, mapping=marked)
            args = [self.prefix, "telegram/", CHANNEL_MARK, self.history_ttl]
            self._call(self._mark_chats, keys=[self._key("expiring")], args=args)
            self._call(self.redis.set, self._key("schema"), SCHEMA_VERSION)
        self._up_to_date = True

    def close(self) -> None:
        self._closed.set()
        if self._subscriber:
            self._subscriber.join(timeout=5)
        self.pool.disconnect()

    # -- plumbing --------------------------------------------------------------------------

    def _start_subscriber(self) -> None:
        with self._subscriber_lock:
            if self._subscriber is None:
                self._subscriber = threading.Thread(target=self._relay_wakes, name="redis-wakes", daemon=True)
                self._subscriber.start()

    def _relay_wakes(self) -> None:
        """Listen on the wake channel for the life of the process, reconnecting when Redis comes back."""
        while not self._closed.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._key("wake"))
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message:
                        self._waiters.wake(message["data"])
            except (redis.ConnectionError, redis.TimeoutError):
                self._closed.wait(1.0)  # the followers' polls cover the gap
            finally:
                pubsub.close()

    def _records(self, task_ids: list[str]) -> list[TaskRecord]:
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(self._key("task:", task_id))
            return [_task_record(fields) for fields in self._call(pipe.execute) if fields]

    def _script(self, lua: str):
        """A Lua script with the states written in ($pending, ...), registered with Redis."""
        return self.redis.register_script(_QUEUE_MEMBER_LUA + "\n" + string.Template(lua).substitute(LUA_STATES))

    def _key(self, kind: str, name: str = "") -> str:
        return self.prefix + kind + name

    @staticmethod
    def _call(function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailable(str(error)) from None
        except redis.ResponseError as error:
            if str(error).startswith(REFUSING_WRITES):
                raise StoreUnavailable(str(error)) from None
            raise


def _task_record(fields: dict) -> TaskRecord:
    """A task's hash as a record. Until schema 5 its target was `callback_url`: tasks recorded before the
    upgrade (kept a day) still go where they asked; this line can go a day after every instance upgraded."""
    if "callback_url" in fields:
        fields = {"deliver_to": fields["callback_url"], **fields}
    return task_record(fields)


def _picture(entry: str) -> Picture:
    return Picture(**json.loads(entry))


def _pairs(values: dict) -> list:
    """Field/value pairs for HSET, with None as ""."""
    pairs: list = []
    for name, value in values.items():
        pairs += [name, "" if value is None else value]
    return pairs
