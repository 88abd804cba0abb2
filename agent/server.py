"""The agent's core without MQTT: validate and enqueue on the network thread, generate on a scheduler thread.

The transport calls `handle(Inbound)` from its network thread. That call only parses, checks limits and puts
the request into the inbox (or answers an error at once: `busy` when the agent already holds
max_batch + queue_size requests). Requests and controls (cancel, resend) wait in two separate queues: requests
are bounded by that count, so their queue never refuses one; controls have their own bound, and a flood of
them is dropped (and counted) without touching a request. One scheduler thread owns the BatchGenerator:
between two steps it drains the inbox (so a cancel lands within one step), admits waiting requests into free
cache rows (refusing those that waited past their expiry), runs one batched step (at most one prefill chunk
plus one decode, so no step is long) and streams the text in chunks. Every accepted request ends with
exactly one final message, `done` or `error`: nothing is dropped silently.
"""
from __future__ import annotations

import inspect
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import count
from typing import Callable, Optional, Protocol

from agent import protocol as P
from agent.chat_template import split_reasoning
from agent.config import DEFAULT_PREFILL_CHUNK, AgentConfig
from agent.constraints import Grammars, parsed_json
from agent.errors import AgentInputError
from agent.generation import Backend, BatchGenerator, Completion
from agent.tokenizer import Tokenizer

log = logging.getLogger("cpm-edge.agent")

CONTROLS_PER_STEP = 256  # cancels/resends handled between two steps at most (the rest wait their turn)


class Outbox(Protocol):
    def publish(self, topic: str, payload: bytes, correlation_data: Optional[bytes] = None,
                retain: bool = False) -> None: ...


@dataclass
class _Job:
    req: P.Request
    key: int
    seq: int = 0                    # next sequence number on the reply topic
    buffer: list = field(default_factory=list)
    buffered: int = 0               # text pieces in buffer (about one per token)
    last_flush: float = 0.0
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    prompt_tokens: int = 0
    abort: Optional[tuple[str, str]] = None  # (code, message): end with this error instead of `done`


class Inbox:
    """What the network thread hands the scheduler: requests and controls in two queues under one condition,
    so neither can take the other's place and the scheduler wakes for either."""

    def __init__(self, control_limit: int):
        self.requests: deque = deque()  # bounded by AgentServer's capacity count, never refused here
        self.controls: deque = deque()
        self.control_limit = control_limit
        self._cond = threading.Condition()
        self._woken = False

    def put_request(self, req: P.Request):
        with self._cond:
            self.requests.append(req)
            self._cond.notify()

    def put_control(self, kind: str, control: P.Control) -> bool:
        """False when the control queue is full (the control is dropped, no request is affected)."""
        with self._cond:
            if len(self.controls) >= self.control_limit:
                return False
            self.controls.append((kind, control))
            self._cond.notify()
            return True

    def wake(self):
        with self._cond:
            self._woken = True
            self._cond.notify()

    def take(self, wait_s: float, max_controls: int) -> tuple[list, list]:
        """Every waiting request and up to max_controls controls; waits up to wait_s when both are empty."""
        with self._cond:
            if wait_s > 0:
                self._cond.wait_for(lambda: self.requests or self.controls or self._woken, wait_s)
            self._woken = False
            requests = list(self.requests)
            self.requests.clear()
            controls = [self.controls.popleft() for _ in range(min(max_controls, len(self.controls)))]
        return requests, controls


class AgentServer:
    """Serves one backend. Thread-safe entry points: handle(), stats(), stop()."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, config: AgentConfig, info: Optional[dict] = None,
                 clock=time.monotonic):
        self.backend, self.tokenizer, self.config = backend, tokenizer, config
        self.info = dict(info or {})
        self.clock = clock
        self.topics = P.Topics(config.prefix, config.device_id, config.pool, config.fleet_group)
        self.limits = P.Limits(config.max_payload_bytes, config.max_tokens, config.default_max_tokens,
                               config.max_wait_s)
        self.max_prompt_tokens = min(config.max_prompt_tokens or backend.max_seq - 1, backend.max_seq - 1)
        self.capacity = backend.max_batch + config.queue_size
        self.inbox = Inbox(config.control_queue_size)
        self.grammars = Grammars(tokenizer, background=True)  # structured output (vocabulary index: a thread)
        self.prefill_chunk = config.prefill_chunk or _bundle_chunk(self.info) or DEFAULT_PREFILL_CHUNK
        if "start" not in inspect.signature(backend.prefill).parameters:
            log.warning("%s.prefill takes no start position: prompts are prefilled whole, a long one stalls "
                        "the other streams for its whole prefill", type(backend).__name__)
            self.prefill_chunk = None
        self.outbox: Optional[Outbox] = None
        self._lock = threading.Lock()
        self._outstanding = 0            # accepted, not yet answered with a final message
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.heartbeat = clock()         # the scheduler's last step (the systemd watchdog checks it)
        self.counters = {"received": 0, "accepted": 0, "completed": 0, "cancelled": 0, "tokens": 0,
                         "unanswerable": 0, "controls_dropped": 0, "errors": {}}
        self._ids = count()
        self._submitted = count()        # names of requests that came through submit()
        # scheduler-thread state
        self.generator = self._new_generator()
        self.pending: deque[_Job] = deque()     # accepted, not yet in the generator
        self.jobs: dict[int, _Job] = {}         # key -> job, pending or running
        self.by_target: dict = {}               # ReplyTarget.key -> job
        self.finished: OrderedDict = OrderedDict()  # ReplyTarget.key -> (time, target, payload)
        # what cancel/resend name requests by (ReplyTarget.refs) -> keys: a flood of controls costs a lookup each
        self.job_refs: dict = {}                # ref -> {job key}
        self.finished_refs: dict = {}           # ref -> {ReplyTarget.key}

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self, outbox: Outbox):
        self.outbox = outbox
        self._thread = threading.Thread(target=self._run, name="cpm-scheduler", daemon=True)
        self._thread.start()

    def stop(self, grace_s: Optional[float] = None, timeout: float = 30.0) -> bool:
        """Refuse new requests, give running ones grace_s to finish, end the rest with `shutting_down`."""
        self._grace_until = self.clock() + (self.config.shutdown_grace_s if grace_s is None else grace_s)
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        return self._stopped.is_set() or self._thread is None

    @property
    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    @property
    def running(self) -> bool:
        """The scheduler thread serves (started, alive, not stopping): what the HTTP health check reports."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def stats(self) -> dict:
        with self._lock:
            c = dict(self.counters, errors=dict(self.counters["errors"]))
            c["outstanding"] = self._outstanding
        c["capacity"] = self.capacity
        return c

    # --- network thread: validate and enqueue only ----------------------------------------------------
    def submit(self, data: dict, sink: Callable[[bytes], None]) -> Callable[[], bool]:
        """A request from a transport other than MQTT (the HTTP API): `data` is the object an MQTT client
        sends, validated by the same parse_request; every reply payload goes to sink(payload), called from the
        scheduler thread (or from this one for a refusal), so it must not block. Returns cancel(), which
        ends the request as `cancelled` (False when the control queue is full)."""
        # A '$' topic is never an MQTT reply topic, and a random correlation: no MQTT cancel/resend can name it.
        topic, corr = f"$local/{next(self._submitted)}", secrets.token_bytes(16)
        payload = json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")
        self.handle_request(P.Inbound(self.topics.request, payload, topic, corr, sink=sink))
        return lambda: self.inbox.put_control("cancel", P.Control(None, corr, topic))

    def handle(self, msg: P.Inbound):
        kind = self.topics.kind_of(msg.topic)
        if kind == "request":
            self.handle_request(msg)
        elif kind in ("cancel", "resend"):
            self.handle_control(msg, kind)
        else:
            log.debug("message on unexpected topic %s ignored", msg.topic)

    def handle_request(self, msg: P.Inbound):
        self._count("received")
        try:
            req = P.parse_request(msg, self.limits, self.tokenizer.defaults)
        except P.RequestError as e:
            self._refuse(e)
            return
        if self._stopping.is_set():
            self._refuse(P.RequestError(P.SHUTTING_DOWN, "the agent is shutting down", req.target))
            return
        with self._lock:
            if self._outstanding >= self.capacity:
                full = True
            else:
                full = False
                self._outstanding += 1
                self.counters["accepted"] += 1
        if full:
            self._refuse(P.RequestError(P.BUSY, f"{self.capacity} requests already running or queued; "
                                                f"retry later", req.target))
            return
        self.inbox.put_request(req)  # never refused: requests are bounded by capacity above

    def handle_control(self, msg: P.Inbound, kind: str):
        try:
            control = P.parse_control(msg, self.limits, pooled=msg.topic not in (self.topics.cancel,
                                                                                  self.topics.resend))
        except P.RequestError as e:
            log.info("%s on %s refused: %s", kind, msg.topic, e.message)
            return
        if not self.inbox.put_control(kind, control):
            self._count("controls_dropped")
            dropped = self.counters["controls_dropped"]
            if dropped in (1, 10, 100, 1000) or dropped % 10_000 == 0:
                log.warning("%s dropped: %d cancel/resend messages waiting already (%d dropped so far; "
                            "no request is affected)", kind, self.config.control_queue_size, dropped)

    def _refuse(self, e: P.RequestError):
        self._count_error(e.code)
        if e.target is None:
            self._count("unanswerable")
            log.info("request refused and cannot be answered (%s): %s", e.code, e.message)
            return
        self._publish(e.target, P.error_payload(e.target.id, 0, e.code, e.message))

    # --- scheduler thread ---------------------------------------------------------------------------
    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(self.backend, self.tokenizer, prefill_chunk=self.prefill_chunk, masks=self.grammars)

    def _wake(self):
        self.inbox.wake()

    def _run(self):
        try:
            while True:
                self.heartbeat = self.clock()
                working = self.generator.busy or bool(self.pending)
                self._drain(block=not working)
                if self._stopping.is_set():
                    self._shutdown_step()
                    if self.outstanding == 0:  # counted before enqueued: nothing accepted is left behind
                        break
                self._admit()
                if self.generator.busy:
                    self._step()
        finally:
            self._stopped.set()

    def _drain(self, block: bool):
        """Take the waiting requests, then (so a cancel right after its request finds it) up to
        CONTROLS_PER_STEP controls; when idle, wait for the first item (1 s at most: heartbeat)."""
        requests, controls = self.inbox.take(1.0 if block else 0.0, CONTROLS_PER_STEP)
        for kind, item in [("request", r) for r in requests] + controls:
            try:
                if kind == "request":
                    self._accept(item)
                elif kind == "cancel":
                    self._cancel(item)
                elif kind == "resend":
                    self._resend(item)
            except Exception:  # a bug must not take the scheduler down; the request gets an `internal` error
                log.exception("scheduler: %s failed", kind)
                if kind == "request" and item.target.key not in self.by_target:
                    self._release(None, item.target, P.error_payload(item.target.id, 0, P.INTERNAL,
                                                                     "internal error"), P.INTERNAL)

    def _accept(self, req: P.Request):
        job = _Job(req, next(self._ids))
        if req.target.key in self.by_target:
            self._release(None, req.target, P.error_payload(req.target.id, 0, P.DUPLICATE_ID,
                          "a request with this id and reply topic is already in flight"), P.DUPLICATE_ID)
            return
        self.jobs[job.key] = job
        self.by_target[req.target.key] = job
        _index(self.job_refs, req.target.refs, job.key)
        self.pending.append(job)

    def _admit(self):
        gen = self.generator
        while self.pending and gen.active + len(gen.waiting) < self.backend.max_batch:
            job = self.pending.popleft()
            req = job.req
            now = self.clock()
            if now > req.deadline:
                self._fail(job, P.EXPIRED, f"waited {now - req.received_at:.1f} s, past its expiry; not run")
                continue
            try:
                if req.messages is not None:
                    ids = self.tokenizer.encode_chat(req.messages, req.chat_template_kwargs, req.tools)
                elif req.chat:
                    ids = self.tokenizer.encode_chat([{"role": "user", "content": req.prompt}],
                                                     req.chat_template_kwargs, req.tools)
                else:
                    ids = self.tokenizer.encode(req.prompt)
                if len(ids) > self.max_prompt_tokens:
                    self._fail(job, P.PROMPT_TOO_LONG, f"prompt: {len(ids)} tokens, this agent takes at most "
                                                       f"{self.max_prompt_tokens}")
                    continue
                constraint = self.grammars.compile(req.constraint) if req.constraint is not None else None
                gen.add(job.key, ids, req.params, self._on_text, self._on_done, constraint)
            except AgentInputError as e:
                self._fail(job, P.BAD_REQUEST, str(e))
                continue
            job.prompt_tokens = len(ids)
            job.admitted_at = job.last_flush = now

    def _step(self):
        try:
            self.generator.step()
        except Exception as e:  # a backend failure ends the requests in the batch, not the agent
            log.exception("backend step failed")
            for job in [j for j in self.jobs.values() if j not in self.pending]:
                job.abort = (P.INTERNAL, f"the backend failed: {type(e).__name__}")
                if not self.generator.cancel(job.key):
                    self._fail(job, P.INTERNAL, job.abort[1])
            self.generator = self._new_generator()

    def _on_text(self, key: int, delta: str):
        job = self.jobs[key]
        now = self.clock()
        if not job.first_token_at:
            job.first_token_at = now
        job.buffer.append(delta)
        job.buffered += 1
        if job.req.stream and (job.seq == 0 or job.buffered >= self.config.chunk_tokens
                               or (now - job.last_flush) * 1000 >= self.config.chunk_ms):
            self._flush(job, now)

    def _flush(self, job: _Job, now: float):
        if job.buffer:
            self._publish(job.req.target, P.chunk_payload(job.req.target.id, job.seq, "".join(job.buffer)))
            job.seq += 1
            job.buffer.clear()
            job.buffered = 0
            job.last_flush = now

    def _on_done(self, key: int, out: Completion):
        job = self.jobs[key]
        now = self.clock()
        self._count("tokens", len(out.token_ids))
        if job.abort is not None:
            self._fail(job, *job.abort)
            return
        if job.req.stream:
            self._flush(job, now)
        first = job.first_token_at or now
        engine_ttft = out.time_to_first_token
        timings = {"queue_ms": (job.admitted_at - job.req.received_at) * 1000,
                   "ttft_ms": (first - job.req.received_at) * 1000,
                   "engine_ttft_ms": engine_ttft * 1000,
                   "decode_ms": out.decode_seconds * 1000,
                   "total_ms": (now - job.req.received_at) * 1000,
                   "tokens_per_s": out.tokens_per_second}
        text, reasoning = out.text, None
        if self.tokenizer.splits_reasoning and (job.req.messages is not None or job.req.chat):
            reasoning, text = split_reasoning(out.text)  # chunks streamed the raw text, tags and all
        payload = P.done_payload(job.req.target.id, job.seq, text, out.finish_reason, out.prompt_tokens,
                                 len(out.token_ids), timings, reasoning=reasoning,
                                 parsed=parsed_json(job.req.constraint, out.finish_reason, text))
        self._count("cancelled" if out.finish_reason == "cancelled" else "completed")
        self._release(job, job.req.target, payload, None)

    def _fail(self, job: _Job, code: str, message: str):
        self._release(job, job.req.target, P.error_payload(job.req.target.id, job.seq, code, message), code)

    def _release(self, job: Optional[_Job], target: P.ReplyTarget, payload: bytes, code: Optional[str]):
        """Send a request's final message and free its place (the one way every accepted request ends)."""
        if job is not None:
            self.jobs.pop(job.key, None)
            _unindex(self.job_refs, target.refs, job.key)
            if self.by_target.get(target.key) is job:
                del self.by_target[target.key]
            self.finished[target.key] = (self.clock(), target, payload)
            self.finished.move_to_end(target.key)
            _index(self.finished_refs, target.refs, target.key)
            self._trim_finished()
        if code is not None:
            self._count_error(code)
        with self._lock:
            self._outstanding -= 1
        self._publish(target, payload)

    def _trim_finished(self):
        oldest = self.clock() - self.config.finished_ttl_s
        while self.finished and (len(self.finished) > self.config.finished_cache
                                 or next(iter(self.finished.values()))[0] < oldest):
            key, (_, target, _) = self.finished.popitem(last=False)
            _unindex(self.finished_refs, target.refs, key)

    def _cancel(self, control: P.Control):
        for job in self._jobs_named(control):
            if job in self.pending:
                self.pending.remove(job)
                job.admitted_at = self.clock()
                self._on_done(job.key, Completion(prompt_tokens=0, finish_reason="cancelled"))
            else:
                self.generator.cancel(job.key)

    def _resend(self, control: P.Control):
        """After a broker restart: send again the final message of a finished request, or say it is unknown."""
        if self._jobs_named(control):
            return  # still running: its final message is still to come
        self._trim_finished()
        keys = {key for ref in control.refs for key in self.finished_refs.get(ref, ())}
        hits = [(t, p) for _, t, p in (self.finished[k] for k in keys) if control.matches(t)]
        for target, payload in hits:
            self._publish(target, payload)
        if not hits and control.reply_to is not None and not control.pooled:
            target = P.ReplyTarget(control.reply_to, control.correlation_data, control.id)
            self._publish(target, P.error_payload(control.id, 0, P.UNKNOWN_REQUEST,
                                                  "no such request in flight or recently finished"))

    def _jobs_named(self, control: P.Control) -> list[_Job]:
        keys = {key for ref in control.refs for key in self.job_refs.get(ref, ())}
        return [self.jobs[k] for k in sorted(keys) if control.matches(self.jobs[k].req.target)]

    def _shutdown_step(self):
        while self.pending:
            self._fail(self.pending.popleft(), P.SHUTTING_DOWN, "the agent is shutting down; not run")
        if self.clock() >= self._grace_until:
            for job in list(self.jobs.values()):
                job.abort = (P.SHUTTING_DOWN, "the agent is shutting down; stopped before the end")
                self.generator.cancel(job.key)

    # --- helpers ------------------------------------------------------------------------------------
    def _publish(self, target: P.ReplyTarget, payload: bytes):
        try:
            if target.sink is not None:  # a request that came through submit(): not an MQTT reply
                target.sink(payload)
            else:
                self.outbox.publish(target.topic, payload, target.correlation_data)
        except Exception:  # a transport failure must not take the scheduler down
            log.exception("publish to %s failed", target.topic)

    def _count(self, key: str, n: int = 1):
        with self._lock:
            self.counters[key] += n

    def _count_error(self, code: str):
        with self._lock:
            self.counters["errors"][code] = self.counters["errors"].get(code, 0) + 1


def _index(index: dict, refs: tuple, key):
    for ref in refs:
        index.setdefault(ref, set()).add(key)


def _unindex(index: dict, refs: tuple, key):
    for ref in refs:
        keys = index.get(ref)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del index[ref]


def _bundle_chunk(info: dict) -> int | None:
    """The prefill chunk a bundle's device profile chose (manifest key prefill_chunk), if it states one."""
    value = info.get("prefill_chunk")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None
