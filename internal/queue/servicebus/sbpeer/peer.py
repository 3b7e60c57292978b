#!/usr/bin/python3
"""sbpeer: an AMQP 1.0 protocol test double for the Azure Service Bus Go SDK.

This is NOT a Service Bus emulator. It implements, on Qpid Proton's Python
binding, exactly the slice of the Service Bus AMQP protocol that sous's
driver (through github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus)
uses, so that the real SDK code runs end to end in tests on a machine without
Docker or Azure:

  * SASL ANONYMOUS on a plain TCP listener (the SDK's UseDevelopmentEmulator).
  * $cbs put-token: every token is accepted (status-code 200); nothing is
    checked.
  * Queues created on first use. A client sender link to "<queue>" enqueues;
    a client receiver link from "<queue>" (or "<queue>/$DeadLetterQueue")
    gets PeekLock deliveries with 16-byte delivery tags, the lock token in the
    x-opt-lock-token delivery annotation and the x-opt-enqueued-time,
    x-opt-sequence-number and x-opt-locked-until message annotations.
  * Dispositions: accepted completes, modified abandons (delivery count + 1,
    annotations become application properties), rejected with
    com.microsoft:dead-letter moves the message to "<queue>/$DeadLetterQueue"
    with DeadLetterReason / DeadLetterErrorDescription, released returns it
    untouched. A disposition for a lock that expired is answered with
    rejected / com.microsoft:message-lock-lost, as Service Bus does.
  * "<queue>/$management": com.microsoft:renew-lock,
    com.microsoft:update-disposition and com.microsoft:peek-message; other
    operations answer 501.
  * Locks expire after the lock duration (delivery count + 1), like Service
    Bus; a consumer link closing does not release its locks.
  * ReceiveAndDelete: a receiver link that asks for settled deliveries
    (snd-settle-mode settled) gets each message presettled, and the message
    is gone from the queue once sent.
  * Sessions, on queues the test marks session-enabled (the "sessions"
    command; Service Bus's RequiresSession): a message sent there without a
    session id is rejected (amqp:not-allowed), and so is a receiver link
    without a session filter. A receiver link whose source carries the
    com.microsoft:session-filter with a session id locks that session: it
    gets that session's messages only, in order; the attach answer echoes
    the filter and carries com.microsoft:locked-until-utc. A second link for
    a session that is locked is refused with
    com.microsoft:session-cannot-be-locked (a null source, then a detach,
    as Service Bus does). The session lock lasts the lock duration; the
    "<queue>/$management" operation com.microsoft:renew-session-lock renews
    it, and a session lock that runs out detaches its link with
    com.microsoft:session-lock-lost. Detaching the link unlocks the session.
  * Queue limits: the "max_messages" command caps a queue's message count;
    a send beyond it is rejected with amqp:resource-limit-exceeded, the
    condition Service Bus uses for a full entity (Service Bus counts bytes,
    MaxSizeInMegabytes; the peer counts messages).

Not implemented: accepting the next available session (a null session
filter), session state, topics, scheduling, deferral, transactions, TTL,
duplicate detection, size limits, authorization, TLS.

Protocol with the test (one JSON object per line):
  stdout, events: {"event": "listening", "port": N}, "cbs", "attach",
    "detach", "enqueued", "delivered", "completed", "abandoned",
    "deadlettered", "released", "renew_lock", "update_disposition",
    "lock_expired", "lock_lost", "management", "reply", "error",
    "rejected_send", "session_locked", "session_refused",
    "session_unlocked", "renew_session_lock", "session_lock_lost".
  stdin, commands: {"cmd": "stats" | "expire_locks" | "lock_duration" |
    "send" | "sessions" | "max_messages", "id": N, ...}; each is answered
    by {"event": "reply", "id": N}.
  The peer exits when stdin closes, so it never outlives its test.

Usage: /usr/bin/python3 peer.py --port N [--lock-duration-ms MS]
"""

import argparse
import collections
import json
import os
import sys
import threading
import time
import uuid

from proton import (
    Array,
    Condition,
    Data,
    Delivery,
    Link,
    Message,
    Terminus,
    UNDESCRIBED,
    int32,
    symbol,
    timestamp,
)
from cproton import pn_message_get_content_type
from proton.handlers import MessagingHandler
from proton.reactor import ApplicationEvent, Container, EventInjector

DLQ_SUFFIX = "/$DeadLetterQueue"
MGMT_SUFFIX = "/$management"
CBS = "$cbs"
LOCK_LOST = "com.microsoft:message-lock-lost"
DEAD_LETTER = "com.microsoft:dead-letter"
SESSION_FILTER = "com.microsoft:session-filter"
SESSION_LOCKED_UNTIL = "com.microsoft:locked-until-utc"
SESSION_CANNOT_BE_LOCKED = "com.microsoft:session-cannot-be-locked"
SESSION_LOCK_LOST = "com.microsoft:session-lock-lost"
# .NET ticks (100ns since 0001-01-01) at the Unix epoch.
TICKS_AT_EPOCH = 621355968000000000


def ticks(ms):
    return TICKS_AT_EPOCH + ms * 10000


def now_ms():
    return int(time.time() * 1000)


def emit(event, **fields):
    fields["event"] = event
    sys.stdout.write(json.dumps(fields, default=str, sort_keys=True) + "\n")
    sys.stdout.flush()


def plain(v):
    """Converts Proton values to something json.dumps prints usefully."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, Array):
        return [plain(x) for x in v.elements]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, uuid.UUID):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def describe(msg):
    return {
        "message_id": plain(msg.id),
        "correlation_id": plain(msg.correlation_id),
        "session_id": msg.group_id,
        "reply_to": msg.reply_to,
        "reply_to_session_id": msg.reply_to_group_id,
        # Message.content_type turns a missing value into the symbol "None".
        "content_type": pn_message_get_content_type(msg._msg),
        "subject": msg.subject,
        "application_properties": plain(msg.properties or {}),
        "body": plain(msg.body),
        "body_kind": body_kind(msg),
    }


def body_kind(msg):
    """The body section Proton decoded: "data", "sequence" or "value".
    Proton keeps one body section: of several data or amqp-sequence
    sections, only the last survives a decode."""
    if msg.inferred and isinstance(msg.body, bytes):
        return "data"
    if msg.inferred and isinstance(msg.body, list):
        return "sequence"
    return "value"


def session_filter(source):
    """Returns (present, session id) of a source's
    com.microsoft:session-filter; the id is None for "the next available
    session"."""
    data = source.filter
    data.rewind()
    if data.next() is None:
        return False, None
    try:
        filters = data.get_object()
    except Exception:  # an odd filter set
        return False, None
    if not isinstance(filters, dict):
        return False, None
    for k, v in filters.items():
        if str(k) == SESSION_FILTER:
            value = getattr(v, "value", v)  # a Described, or a bare value
            return True, (None if value is None else str(value))
    return False, None


def new_lock_token():
    """Returns (tag, token). The delivery tag is the token in .NET GUID byte
    order, as Service Bus sends it; the SDK swaps it back. Proton's Python
    binding takes tags as str, so the 16 bytes are drawn from 7-bit values
    (112 random bits), which encode to themselves."""
    raw = bytes(b & 0x7F for b in os.urandom(16))
    return raw.decode("ascii"), uuid.UUID(bytes_le=raw)


class Record:
    def __init__(self, queue, seq, encoded, session=None):
        self.queue = queue
        self.seq = seq
        self.session = session  # the message's session id (group-id)
        self.encoded = encoded  # the message as stored, re-decoded per delivery
        self.enqueued_ms = now_ms()
        self.delivery_count = 0  # wire value: deliveries so far that failed
        self.lock_token = None
        self.locked_until_ms = 0
        self.delivery = None

    def message(self):
        m = Message()
        m.decode(self.encoded)
        return m

    def store(self, m):
        self.encoded = m.encode()


class Peer(MessagingHandler):
    def __init__(self, port, lock_ms, injector):
        super().__init__(prefetch=100, auto_accept=False, auto_settle=False)
        self.port = port
        self.lock_ms = lock_ms
        self.lock_ms_by_queue = {}
        self.injector = injector
        self.seq = 0
        self.queues = collections.defaultdict(list)  # name -> [Record] in seq order
        self.consumers = collections.defaultdict(list)  # name -> [Sender]
        self.reply_links = {}  # client reply address -> Sender
        self.locks = {}  # uuid -> Record
        self.session_queues = set()  # queues that require sessions
        self.max_messages = {}  # queue -> most messages it holds
        self.sessions = {}  # (queue, session id) -> [Sender link, locked until ms]
        self.session_of = {}  # Sender link -> (queue, session id)
        self.refused = {}  # link -> Condition, detached once opened
        self.container = None

    # --- lifecycle -------------------------------------------------------

    def on_start(self, event):
        self.container = event.container
        self.container.selectable(self.injector)
        self.container.listen("127.0.0.1:%d" % self.port)
        self.container.schedule(0.05, self)
        emit("listening", port=self.port, pid=os.getpid())

    def on_connection_bound(self, event):
        sasl = event.transport.sasl()
        sasl.allowed_mechs("ANONYMOUS")

    def on_connection_opening(self, event):
        emit("connection", properties=plain(event.connection.remote_properties or {}))

    def on_timer_task(self, event):
        self.expire(lambda r: r.locked_until_ms <= now_ms())
        for key, (link, until) in list(self.sessions.items()):
            if until <= now_ms():
                emit("session_lock_lost", queue=key[0], session_id=key[1])
                self.unlock_session(link)
                link.condition = Condition(SESSION_LOCK_LOST, "The session lock has expired (sbpeer).")
                link.close()
        self.container.schedule(0.05, self)

    # --- links -----------------------------------------------------------

    def on_link_opening(self, event):
        link = event.link
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        if link.is_sender:
            src = link.remote_source.address or ""
            emit("attach", role="receiver", address=src, name=link.name,
                 rcv_settle_mode=int(link.remote_rcv_settle_mode),
                 snd_settle_mode=int(link.remote_snd_settle_mode))
            has_filter, sid = session_filter(link.remote_source)
            if src == CBS or src.endswith(MGMT_SUFFIX):
                self.reply_links[link.remote_target.address] = link
            elif has_filter:
                self.lock_session(link, src, sid)
            elif src in self.session_queues:
                self.refuse(link, "amqp:not-allowed",
                            "It is not possible for an entity that requires sessions to create a "
                            "non-sessionful message receiver (sbpeer).")
            else:
                self.consumers[src].append(link)
        else:
            emit("attach", role="sender", address=link.remote_target.address or "", name=link.name)

    def lock_session(self, link, queue, sid):
        if sid is None:
            self.refuse(link, "amqp:not-implemented",
                        "sbpeer accepts named sessions only, not the next available one")
            return
        if queue not in self.session_queues:
            self.refuse(link, "amqp:not-allowed",
                        "It is not possible for an entity that does not require sessions to "
                        "create a sessionful message receiver (sbpeer).")
            return
        if (queue, sid) in self.sessions:
            self.refuse(link, SESSION_CANNOT_BE_LOCKED,
                        "The requested session '%s' cannot be accepted. It may be locked by "
                        "another receiver (sbpeer)." % sid)
            return
        until = now_ms() + self.lock_duration(queue)
        self.sessions[(queue, sid)] = [link, until]
        self.session_of[link] = (queue, sid)
        link.properties = {symbol(SESSION_LOCKED_UNTIL): ticks(until)}
        emit("session_locked", queue=queue, session_id=sid, name=link.name)

    def unlock_session(self, link):
        key = self.session_of.pop(link, None)
        if key is not None and self.sessions.get(key, [None])[0] == link:
            del self.sessions[key]
            emit("session_unlocked", queue=key[0], session_id=key[1], name=link.name)

    def refuse(self, link, cond, description):
        """Answers the attach with a null source, then detaches with cond,
        as Service Bus refuses a link (on_link_opened sends the detach)."""
        emit("session_refused", address=link.remote_source.address or "", name=link.name,
             condition=cond, message=description)
        link.source.type = Terminus.UNSPECIFIED
        self.refused[link] = Condition(cond, description)

    def on_link_opened(self, event):
        cond = self.refused.pop(event.link, None)
        if cond is not None:
            event.link.condition = cond
            event.link.close()

    def on_link_closing(self, event):
        link = event.link
        self.unlock_session(link)
        for links in self.consumers.values():
            if link in links:
                links.remove(link)
        for addr in [a for a, l in self.reply_links.items() if l == link]:
            del self.reply_links[addr]
        emit("detach", name=link.name)

    def on_disconnected(self, event):
        conn = event.connection
        for links in self.consumers.values():
            links[:] = [l for l in links if l.connection != conn]
        for addr in [a for a, l in self.reply_links.items() if l.connection == conn]:
            del self.reply_links[addr]
        for link in [l for l in self.session_of if l.connection == conn]:
            self.unlock_session(link)

    def on_sendable(self, event):
        src = event.link.source.address or ""
        if src in self.consumers or event.link in self.session_of:
            self.pump(src)

    # --- incoming messages: sends, $cbs and $management requests ---------

    def on_message(self, event):
        dlv, msg = event.delivery, event.message
        addr = event.receiver.target.address or event.receiver.remote_target.address or ""
        if addr == CBS:
            self.cbs(msg)
        elif addr.endswith(MGMT_SUFFIX):
            self.management(addr[: -len(MGMT_SUFFIX)], msg)
        else:
            why = self.refusal(addr, msg)
            if why is not None:
                emit("rejected_send", queue=addr, condition=why.name, message=why.description,
                     **describe(msg))
                dlv.local.condition = why
                self.reject(dlv)
                return
            self.enqueue(addr, msg)
        self.accept(dlv)

    def refusal(self, queue, msg):
        """The condition a send to queue is rejected with, or None."""
        if queue in self.session_queues and not msg.group_id:
            return Condition("amqp:not-allowed",
                             "The SessionId was not set on a message, and it cannot be sent to the "
                             "entity. Entities that have session support enabled can only receive "
                             "messages that have the SessionId set to a valid value (sbpeer).")
        limit = self.max_messages.get(queue)
        if limit is not None and len(self.queues[queue]) >= limit:
            return Condition("amqp:resource-limit-exceeded",
                             "The maximum entity size has been reached or exceeded for Queue: '%s' "
                             "(sbpeer: %d messages)." % (queue, limit))
        return None

    def enqueue(self, queue, msg):
        self.seq += 1
        rec = Record(queue, self.seq, msg.encode(), session=msg.group_id or None)
        self.queues[queue].append(rec)
        emit("enqueued", queue=queue, seq=rec.seq, **describe(msg))
        self.pump(queue)
        return rec

    def cbs(self, msg):
        props = msg.properties or {}
        emit("cbs", operation=props.get("operation"), type=props.get("type"),
             audience=props.get("name"))
        if props.get("operation") != "put-token":
            self.reply(msg, 400, "unsupported $cbs operation")
            return
        self.reply(msg, 200, "OK")

    def reply(self, req, status, description, body=None):
        link = self.reply_links.get(req.reply_to)
        if link is None:
            emit("error", message="no reply link for %s" % req.reply_to)
            return
        resp = Message(
            body=body,
            correlation_id=req.id,
            properties={
                "status-code": int32(status),
                "status-description": description,
            },
        )
        link.send(resp)

    def management(self, queue, msg):
        props = msg.properties or {}
        op = props.get("operation")
        body = msg.body if isinstance(msg.body, dict) else {}
        if op == "com.microsoft:renew-lock":
            self.renew_lock(queue, msg, body)
        elif op == "com.microsoft:update-disposition":
            self.update_disposition(queue, msg, body)
        elif op == "com.microsoft:peek-message":
            self.peek(queue, msg, body)
        elif op == "com.microsoft:renew-session-lock":
            self.renew_session_lock(queue, msg, body)
        else:
            emit("management", queue=queue, operation=op, supported=False)
            self.reply(msg, 501, "sbpeer does not implement %s" % op)

    def tokens(self, body):
        v = body.get("lock-tokens")
        if isinstance(v, Array):
            return list(v.elements)
        return list(v or [])

    def held(self, token):
        rec = self.locks.get(token)
        if rec is None or rec.lock_token != token or rec.locked_until_ms <= now_ms():
            return None
        return rec

    def renew_lock(self, queue, msg, body):
        tokens = self.tokens(body)
        recs = [self.held(t) for t in tokens]
        ok = all(r is not None for r in recs) and len(recs) > 0
        emit("renew_lock", queue=queue, lock_tokens=[str(t) for t in tokens], ok=ok)
        if not ok:
            self.reply(msg, 410, "The lock supplied is invalid. Either the lock expired, "
                       "or the message has already been removed from the queue (sbpeer).")
            return
        until = []
        for r in recs:
            r.locked_until_ms = now_ms() + self.lock_duration(r.queue)
            until.append(timestamp(r.locked_until_ms))
        self.reply(msg, 200, "OK", body={"expirations": Array(UNDESCRIBED, Data.TIMESTAMP, *until)})

    def renew_session_lock(self, queue, msg, body):
        sid = body.get("session-id")
        held = self.sessions.get((queue, sid))
        emit("renew_session_lock", queue=queue, session_id=sid, ok=held is not None)
        if held is None:
            self.reply(msg, 410, "The session lock has expired on the MessageSession (sbpeer).")
            return
        held[1] = now_ms() + self.lock_duration(queue)
        self.reply(msg, 200, "OK", body={"expiration": timestamp(held[1])})

    def update_disposition(self, queue, msg, body):
        status = body.get("disposition-status")
        tokens = self.tokens(body)
        recs = [self.held(t) for t in tokens]
        ok = all(r is not None for r in recs) and len(recs) > 0
        emit("update_disposition", queue=queue, status=status,
             lock_tokens=[str(t) for t in tokens], ok=ok)
        if not ok:
            self.reply(msg, 410, "lock lost (sbpeer)")
            return
        modify = body.get("properties-to-modify") or {}
        for r in recs:
            if status == "completed":
                self.complete(r, via="management")
            elif status == "abandoned":
                self.abandon(r, modify, via="management")
            elif status == "suspended":
                self.dead_letter(r, body.get("deadletter-reason"),
                                 body.get("deadletter-description"), modify, via="management")
            else:
                self.reply(msg, 501, "sbpeer does not implement disposition %s" % status)
                return
        self.reply(msg, 200, "OK")

    def peek(self, queue, msg, body):
        start = int(body.get("from-sequence-number", 0))
        count = int(body.get("message-count", 1))
        found = [r for r in self.queues.get(queue, []) if r.seq >= start][:count]
        emit("management", queue=queue, operation="com.microsoft:peek-message",
             supported=True, count=len(found))
        if not found:
            self.reply(msg, 204, "No messages")
            return
        self.reply(msg, 200, "OK", body={"messages": [{"message": r.encoded} for r in found]})

    # --- deliveries to consumers -----------------------------------------

    def lock_duration(self, queue):
        return self.lock_ms_by_queue.get(queue, self.lock_ms)

    def pump(self, queue):
        """Hands the queue's available messages to its consumers: a
        session's messages only to the link that holds the session, in
        order; the others to the plain consumers."""
        for (q, sid), (link, _) in list(self.sessions.items()):
            if q != queue:
                continue
            while link.credit > 0:
                # A session is delivered in order: nothing after a message
                # that is still locked.
                rec = next((r for r in self.queues.get(queue, []) if r.session == sid), None)
                if rec is None or rec.lock_token is not None:
                    break
                self.deliver(link, rec)
        for link in list(self.consumers.get(queue, [])):
            while link.credit > 0:
                rec = next((r for r in self.queues.get(queue, []) if r.lock_token is None), None)
                if rec is None:
                    return
                self.deliver(link, rec)

    def deliver(self, link, rec):
        if link.snd_settle_mode == Link.SND_SETTLED:
            self.deliver_settled(link, rec)
            return
        tag, token = new_lock_token()
        rec.lock_token = token
        rec.locked_until_ms = now_ms() + self.lock_duration(rec.queue)
        self.locks[token] = rec
        m = rec.message()
        m.delivery_count = rec.delivery_count
        ann = dict(m.annotations or {})
        ann[symbol("x-opt-enqueued-time")] = timestamp(rec.enqueued_ms)
        ann[symbol("x-opt-sequence-number")] = rec.seq
        ann[symbol("x-opt-locked-until")] = timestamp(rec.locked_until_ms)
        m.annotations = ann
        m.instructions = {symbol("x-opt-lock-token"): token}
        dlv = link.delivery(tag)
        link.stream(m.encode())
        link.advance()
        rec.delivery = dlv
        emit("delivered", queue=rec.queue, seq=rec.seq, lock_token=str(token),
             delivery_count=rec.delivery_count + 1, message_id=plain(m.id))

    def deliver_settled(self, link, rec):
        """ReceiveAndDelete: the message goes presettled and is removed."""
        tag, _ = new_lock_token()
        m = rec.message()
        m.delivery_count = rec.delivery_count
        ann = dict(m.annotations or {})
        ann[symbol("x-opt-enqueued-time")] = timestamp(rec.enqueued_ms)
        ann[symbol("x-opt-sequence-number")] = rec.seq
        m.annotations = ann
        dlv = link.delivery(tag)
        link.stream(m.encode())
        link.advance()
        dlv.settle()
        self.remove(rec)
        emit("delivered", queue=rec.queue, seq=rec.seq, delivery_count=rec.delivery_count + 1,
             message_id=plain(m.id), session_id=rec.session, settled=True)
        emit("completed", queue=rec.queue, seq=rec.seq, delivery_count=rec.delivery_count + 1,
             via="receive_and_delete", message_id=plain(m.id))

    def outgoing(self, dlv):
        """Returns the record a consumer's disposition refers to, or None
        (after answering lock-lost) when its lock is gone."""
        token = uuid.UUID(bytes_le=dlv.tag.encode("latin-1"))
        rec = self.held(token)
        if rec is None:
            emit("lock_lost", lock_token=str(token), via="link")
            dlv.local.condition = Condition(LOCK_LOST, "The lock supplied is invalid (sbpeer).")
            dlv.update(Delivery.REJECTED)
            dlv.settle()
        return rec

    def on_accepted(self, event):
        dlv = event.delivery
        rec = self.outgoing(dlv)
        if rec is not None:
            self.complete(rec, via="link")
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()

    def on_rejected(self, event):
        dlv = event.delivery
        rec = self.outgoing(dlv)
        if rec is None:
            return
        cond = dlv.remote.condition
        info = dict((cond.info or {}) if cond else {})
        reason = info.pop("DeadLetterReason", None)
        description = info.pop("DeadLetterErrorDescription", None)
        if cond is not None and cond.name != DEAD_LETTER:
            emit("error", message="reject with unexpected condition %s" % cond.name)
        self.dead_letter(rec, reason, description, info, via="link")
        dlv.update(Delivery.REJECTED)
        dlv.settle()

    def on_released(self, event):  # released and modified
        dlv = event.delivery
        rec = self.outgoing(dlv)
        if rec is None:
            return
        if dlv.remote_state == Delivery.MODIFIED:
            self.abandon(rec, dict(dlv.remote.annotations or {}), via="link",
                         failed=bool(dlv.remote.failed),
                         undeliverable=bool(dlv.remote.undeliverable))
            dlv.update(Delivery.MODIFIED)
        else:
            self.unlock(rec)
            emit("released", queue=rec.queue, seq=rec.seq)
            self.pump(rec.queue)
            dlv.update(Delivery.RELEASED)
        dlv.settle()

    # --- state changes ---------------------------------------------------

    def unlock(self, rec):
        self.locks.pop(rec.lock_token, None)
        rec.lock_token = None
        rec.locked_until_ms = 0
        rec.delivery = None

    def remove(self, rec):
        self.unlock(rec)
        q = self.queues.get(rec.queue, [])
        if rec in q:
            q.remove(rec)

    def complete(self, rec, via):
        count = rec.delivery_count + 1
        self.remove(rec)
        emit("completed", queue=rec.queue, seq=rec.seq, delivery_count=count, via=via,
             message_id=plain(rec.message().id))

    def abandon(self, rec, modify, via, failed=False, undeliverable=False):
        count = rec.delivery_count + 1
        self.unlock(rec)
        rec.delivery_count += 1
        if modify:
            m = rec.message()
            props = dict(m.properties or {})
            props.update({str(k): v for k, v in modify.items()})
            m.properties = props
            rec.store(m)
        emit("abandoned", queue=rec.queue, seq=rec.seq, delivery_count=count, via=via,
             properties_to_modify=plain(modify), delivery_failed=failed,
             undeliverable_here=undeliverable)
        self.pump(rec.queue)

    def dead_letter(self, rec, reason, description, modify, via):
        count = rec.delivery_count + 1
        self.remove(rec)
        m = rec.message()
        props = dict(m.properties or {})
        props.update({str(k): v for k, v in (modify or {}).items()})
        if reason is not None:
            props["DeadLetterReason"] = reason
        if description is not None:
            props["DeadLetterErrorDescription"] = description
        m.properties = props
        ann = dict(m.annotations or {})
        ann[symbol("x-opt-deadletter-source")] = rec.queue
        m.annotations = ann
        emit("deadlettered", queue=rec.queue, seq=rec.seq, delivery_count=count, via=via,
             reason=reason, description=description, message_id=plain(m.id),
             application_properties=plain(props))
        dlq = rec.queue + DLQ_SUFFIX
        self.seq += 1
        moved = Record(dlq, self.seq, m.encode())
        moved.delivery_count = rec.delivery_count
        self.queues[dlq].append(moved)
        self.pump(dlq)

    def expire(self, pred, queue=None):
        n = 0
        for name, recs in list(self.queues.items()):
            if queue is not None and name != queue:
                continue
            for r in recs:
                if r.lock_token is not None and pred(r):
                    emit("lock_expired", queue=name, seq=r.seq, lock_token=str(r.lock_token))
                    self.unlock(r)
                    r.delivery_count += 1
                    n += 1
            if n:
                self.pump(name)
        return n

    # --- control from the test -------------------------------------------

    def on_control(self, event):
        cmd = event.subject
        if cmd is None:
            self.container.stop()
            return
        name, cid = cmd.get("cmd"), cmd.get("id")
        if name == "stats":
            stats = {}
            for q, recs in self.queues.items():
                stats[q] = {
                    "available": sum(1 for r in recs if r.lock_token is None),
                    "locked": sum(1 for r in recs if r.lock_token is not None),
                }
            emit("reply", id=cid, queues=stats)
        elif name == "expire_locks":
            n = self.expire(lambda r: True, queue=cmd.get("queue"))
            emit("reply", id=cid, expired=n)
        elif name == "lock_duration":
            self.lock_ms_by_queue[cmd["queue"]] = int(cmd["ms"])
            emit("reply", id=cid)
        elif name == "sessions":
            self.session_queues.add(cmd["queue"])
            emit("reply", id=cid)
        elif name == "max_messages":
            self.max_messages[cmd["queue"]] = int(cmd["n"])
            emit("reply", id=cid)
        elif name == "send":
            fields = {
                "id": cmd.get("message_id"),
                "correlation_id": cmd.get("correlation_id"),
                "reply_to": cmd.get("reply_to"),
                "reply_to_group_id": cmd.get("reply_to_session_id"),
                "group_id": cmd.get("session_id"),
                "content_type": cmd.get("content_type"),
                "properties": cmd.get("application_properties"),
            }
            m = Message(body=cmd.get("body", "").encode("utf-8"),
                        **{k: v for k, v in fields.items() if v})
            m.inferred = True
            rec = self.enqueue(cmd["queue"], m)
            emit("reply", id=cid, seq=rec.seq)
        else:
            emit("reply", id=cid, error="unknown command %r" % name)


def read_stdin(injector):
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
        except ValueError as e:
            emit("error", message="bad command: %s" % e)
            continue
        injector.trigger(ApplicationEvent("control", subject=cmd))
    injector.trigger(ApplicationEvent("control", subject=None))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--lock-duration-ms", type=int, default=30000)
    args = p.parse_args()
    injector = EventInjector()
    threading.Thread(target=read_stdin, args=(injector,), daemon=True).start()
    Container(Peer(args.port, args.lock_duration_ms, injector)).run()


if __name__ == "__main__":
    main()
