"""The MQTT protocol of the agent without MQTT: topics, request validation, reply payloads (docs/protocol.md).

Everything here is pure: it turns an `Inbound` message (payload plus the few MQTT v5 properties that matter)
into a `Request` or a `RequestError`, and builds reply payloads. The transport adapter and the scheduler use
it; tests use it directly.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from agent.chat_template import check_template_kwargs, check_tools
from agent.constraints import ConstraintSpec, parse_constraint
from agent.errors import AgentInputError
from agent.generation import SamplingParams

VERSION = "v1"

# Stable error codes (clients switch on these; the message is for humans).
BAD_JSON = "bad_json"
BAD_REQUEST = "bad_request"
PAYLOAD_TOO_LARGE = "payload_too_large"
PROMPT_TOO_LONG = "prompt_too_long"
TOO_MANY_TOKENS = "too_many_tokens"
BUSY = "busy"
EXPIRED = "expired"
DUPLICATE_ID = "duplicate_id"
UNKNOWN_REQUEST = "unknown_request"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"
ERROR_CODES = (BAD_JSON, BAD_REQUEST, PAYLOAD_TOO_LARGE, PROMPT_TOO_LONG, TOO_MANY_TOKENS, BUSY, EXPIRED,
               DUPLICATE_ID, UNKNOWN_REQUEST, SHUTTING_DOWN, INTERNAL)

REQUEST_KEYS = {"id", "reply_to", "prompt", "messages", "chat", "max_tokens", "temperature", "top_p", "top_k",
                "seed", "stop", "stream", "expiry", "chat_template_kwargs", "tools", "response_format", "grammar"}
MAX_ID_CHARS = 128
MAX_STOPS = 8
MAX_STOP_CHARS = 64


@dataclass(frozen=True)
class Topics:
    """<prefix>/<device>/{request,cancel,resend,status,telemetry}; replies go where each client asks.

    A fleet shares <prefix>/pool/<pool>/request through $share/<group>/ (one agent takes each request) and
    hears <prefix>/pool/<pool>/{cancel,resend} on plain subscriptions (every agent checks its own requests).
    """
    prefix: str
    device: str
    pool: Optional[str] = None
    group: Optional[str] = None

    def of(self, leaf: str) -> str:
        return f"{self.prefix}/{self.device}/{leaf}"

    @property
    def request(self): return self.of("request")

    @property
    def cancel(self): return self.of("cancel")

    @property
    def resend(self): return self.of("resend")

    @property
    def status(self): return self.of("status")

    @property
    def telemetry(self): return self.of("telemetry")

    def reply_space(self, client: str) -> str:
        """The reply topic a client of this device should use (what a per-client ACL grants it)."""
        return self.of(f"reply/{client}")

    def pool_topic(self, leaf: str) -> str:
        return f"{self.prefix}/pool/{self.pool}/{leaf}"

    def subscriptions(self) -> list[tuple[str, str]]:
        """(topic filter, kind) pairs the agent subscribes to; kind is request, cancel or resend."""
        subs = [(self.request, "request"), (self.cancel, "cancel"), (self.resend, "resend")]
        if self.pool is not None:
            subs += [(f"$share/{self.group}/{self.pool_topic('request')}", "request"),
                     (self.pool_topic("cancel"), "cancel"), (self.pool_topic("resend"), "resend")]
        return subs

    def kind_of(self, topic: str) -> Optional[str]:
        """Which handler a received topic goes to (shared subscriptions deliver the plain topic name)."""
        for filt, kind in self.subscriptions():
            if filt.startswith("$share/"):
                filt = filt.split("/", 2)[2]
            if topic == filt:
                return kind
        return None


@dataclass
class Inbound:
    """One received message, as the transport hands it over (no MQTT types)."""
    topic: str
    payload: bytes
    response_topic: Optional[str] = None       # MQTT v5 ResponseTopic
    correlation_data: Optional[bytes] = None   # MQTT v5 CorrelationData
    expiry_s: Optional[float] = None           # MQTT v5 MessageExpiryInterval left when delivered
    received_at: float = field(default_factory=time.monotonic)
    sink: Optional[Callable[[bytes], None]] = None  # not MQTT (AgentServer.submit): replies go to this callable


@dataclass
class ReplyTarget:
    """Where and how to answer: the topic, the v5 correlation data to echo, the id to put in the payload."""
    topic: str
    correlation_data: Optional[bytes] = None
    id: Any = None
    # Set for requests that came through AgentServer.submit (HTTP): replies are handed to it instead of the
    # outbox. Not part of the key; such a topic starts with '$', which no MQTT reply topic may (valid_topic_name).
    sink: Optional[Callable[[bytes], None]] = field(default=None, compare=False, repr=False)

    @property
    def key(self):
        """Identifies a request among those in flight: reply topic + id (or correlation data)."""
        return (self.topic, _id_key(self.id), self.correlation_data)

    @property
    def refs(self) -> tuple:
        """What a cancel or resend may name this request by (see Control.refs)."""
        return _refs(self.id, self.correlation_data)


@dataclass
class Request:
    target: ReplyTarget
    params: SamplingParams
    prompt: Optional[str] = None
    messages: Optional[list] = None
    chat: bool = False
    stream: bool = True
    received_at: float = 0.0
    deadline: float = math.inf   # monotonic time after which it must not start
    chat_template_kwargs: Optional[dict] = None  # extra variables for the chat template (enable_thinking, ...)
    tools: Optional[list] = None                 # function schemas for the chat template
    constraint: Optional[ConstraintSpec] = None  # response_format / grammar the answer must follow


class RequestError(Exception):
    """A refusal with a stable code; `target` is where to send it (None: the sender cannot be answered)."""

    def __init__(self, code: str, message: str, target: Optional[ReplyTarget] = None):
        super().__init__(message)
        self.code, self.message, self.target = code, message, target


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 64 * 1024
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_wait_s: float = 120.0


def _id_key(value):
    return None if value is None else json.dumps(value)


def valid_topic_name(topic) -> bool:
    """A topic one may publish to: non-empty UTF-8 under 64 KiB, no wildcards, no NUL, not $-reserved."""
    if not isinstance(topic, str) or not topic or "\x00" in topic or "+" in topic or "#" in topic:
        return False
    if topic.startswith("$"):
        return False
    try:
        return len(topic.encode("utf-8")) <= 65535
    except UnicodeEncodeError:  # lone surrogates from JSON escapes
        return False


def _valid_id(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2 ** 63) <= value < 2 ** 63
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _decode_object(msg: Inbound, limits: Limits, what: str) -> dict:
    if len(msg.payload) > limits.max_payload_bytes:
        raise RequestError(PAYLOAD_TOO_LARGE, f"{what}: {len(msg.payload)} bytes, the limit is "
                                              f"{limits.max_payload_bytes}")
    try:
        data = json.loads(msg.payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RequestError(BAD_JSON, f"{what}: not a JSON object ({type(e).__name__}: {str(e)[:80]})") from None
    except ValueError as e:  # e.g. integers too long to parse
        raise RequestError(BAD_JSON, f"{what}: not a JSON object ({str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise RequestError(BAD_JSON, f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _peek(payload: bytes, limits: Limits) -> Optional[dict]:
    """An oversized payload is still read for its reply_to/id (up to 16x the limit) so it can be answered."""
    if len(payload) > 16 * limits.max_payload_bytes:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def reply_target(msg: Inbound, data: Optional[dict]) -> Optional[ReplyTarget]:
    """The v5 ResponseTopic wins; else the payload's reply_to (3.1.1 clients). None when neither is usable."""
    data = data or {}
    rid = data.get("id")
    rid = rid if _valid_id(rid) else None
    if msg.sink is not None:
        return ReplyTarget(msg.response_topic, msg.correlation_data, rid, msg.sink)
    if msg.response_topic is not None:
        if valid_topic_name(msg.response_topic):
            return ReplyTarget(msg.response_topic, msg.correlation_data, rid)
        return None
    reply_to = data.get("reply_to")
    if valid_topic_name(reply_to) and rid is not None:
        return ReplyTarget(reply_to, None, rid)
    return None


def parse_request(msg: Inbound, limits: Limits, defaults: Optional[dict] = None) -> Request:
    """Validate a request payload; raise RequestError (with the reply target when one can be found)."""
    try:
        data = _decode_object(msg, limits, "request")
    except RequestError as e:
        e.target = reply_target(msg, _peek(msg.payload, limits) if e.code == PAYLOAD_TOO_LARGE else None)
        raise
    target = reply_target(msg, data)
    if target is None:
        if msg.response_topic is not None:
            why = "the MQTT v5 response topic is not a valid topic name"
        elif "reply_to" not in data or "id" not in data:
            why = "it has neither an MQTT v5 response topic nor 'reply_to' and 'id' in the payload"
        else:
            why = "'reply_to' must be a topic name without wildcards and 'id' a string (<= 128 chars) or integer"
        raise RequestError(BAD_REQUEST, f"request cannot be answered: {why}")

    def bad(message: str, code: str = BAD_REQUEST):
        return RequestError(code, message, target)

    if "id" in data and not _valid_id(data["id"]):
        raise bad(f"id: must be a string of 1-{MAX_ID_CHARS} characters or an integer, got {_show(data['id'])}")
    unknown = sorted(set(data) - REQUEST_KEYS)
    if unknown:
        raise bad(f"{unknown[0]}: unknown key (known: {', '.join(sorted(REQUEST_KEYS))})")
    prompt, messages = data.get("prompt"), data.get("messages")
    if (prompt is None) == (messages is None):
        raise bad("give exactly one of 'prompt' (a string) or 'messages' (a list of {role, content})")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise bad(f"prompt: must be a non-empty string, got {_show(prompt)}")
    if messages is not None and (not isinstance(messages, list) or not messages):
        raise bad("messages: expected a non-empty list of {role, content} objects")
    for key in ("chat", "stream"):
        if key in data and not isinstance(data[key], bool):
            raise bad(f"{key}: must be true or false, got {_show(data[key])}")
    template_kwargs, tools = data.get("chat_template_kwargs"), data.get("tools")
    try:
        template_kwargs = None if template_kwargs is None else check_template_kwargs(template_kwargs)
        tools = None if tools is None else check_tools(tools)
    except AgentInputError as e:
        raise bad(str(e)) from None
    if (template_kwargs is not None or tools is not None) and messages is None and not data.get("chat"):
        raise bad(f"{'chat_template_kwargs' if template_kwargs is not None else 'tools'}: only for a chat "
                  f"('messages', or 'prompt' with \"chat\": true)")

    d = defaults or {}
    max_tokens = data.get("max_tokens", limits.default_max_tokens)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limits.max_tokens:
        raise bad(f"max_tokens: {max_tokens} exceeds this agent's limit of {limits.max_tokens}", TOO_MANY_TOKENS)
    stop = data.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOPS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise bad(f"stop: a string or a list of at most {MAX_STOPS} non-empty strings of at most "
                  f"{MAX_STOP_CHARS} characters")
    params = SamplingParams(max_tokens=max_tokens,
                            temperature=data.get("temperature", d.get("temperature", 0.0)),
                            top_p=data.get("top_p", d.get("top_p", 1.0)),
                            top_k=data.get("top_k", d.get("top_k", 0)),
                            seed=data.get("seed"), stop=tuple(stop))
    try:
        params.validate()
    except AgentInputError as e:
        raise bad(str(e)) from None
    for key in ("temperature", "top_p"):
        if isinstance(getattr(params, key), bool) or not math.isfinite(getattr(params, key)):
            raise bad(f"{key}: must be a finite number")
    if params.seed is not None and not -(2 ** 63) <= params.seed < 2 ** 64:
        raise bad("seed: must fit in 64 bits")
    try:
        constraint = parse_constraint(data, limits.max_payload_bytes)
    except AgentInputError as e:
        raise bad(str(e)) from None

    deadline = msg.received_at + limits.max_wait_s if limits.max_wait_s > 0 else math.inf
    if msg.expiry_s is not None:
        deadline = min(deadline, msg.received_at + msg.expiry_s)
    if "expiry" in data:
        expiry = data["expiry"]
        if isinstance(expiry, bool) or not isinstance(expiry, (int, float)) or not 0 < expiry < 1e9:
            raise bad(f"expiry: seconds > 0, got {_show(expiry)}")
        deadline = min(deadline, msg.received_at + expiry)
    return Request(target=target, params=params, prompt=prompt, messages=messages,
                   chat=bool(data.get("chat", False)), stream=bool(data.get("stream", True)),
                   received_at=msg.received_at, deadline=deadline, chat_template_kwargs=template_kwargs,
                   tools=tools, constraint=constraint)


@dataclass
class Control:
    """A cancel or resend: which request(s) it names."""
    id: Any = None
    correlation_data: Optional[bytes] = None
    reply_to: Optional[str] = None
    pooled: bool = False  # came on a pool topic: other agents may hold the request, so never say `unknown`

    @property
    def refs(self) -> tuple:
        """The names this control gives: a request matches only if it shares one (then `matches` decides)."""
        return _refs(self.id, self.correlation_data)

    def matches(self, target: ReplyTarget) -> bool:
        if self.reply_to is not None and self.reply_to != target.topic:
            return False
        if self.id is not None and _id_key(self.id) == _id_key(target.id):
            return True
        return self.correlation_data is not None and self.correlation_data == target.correlation_data


def _refs(rid, correlation_data) -> tuple:
    return tuple(ref for ref in (("id", _id_key(rid)) if rid is not None else None,
                                 ("corr", correlation_data) if correlation_data is not None else None) if ref)


def parse_control(msg: Inbound, limits: Limits, pooled: bool = False) -> Control:
    """{"id": ..., "reply_to": optional} and/or the v5 CorrelationData of the request."""
    data = _decode_object(msg, limits, "cancel/resend")
    rid = data.get("id")
    if rid is not None and not _valid_id(rid):
        raise RequestError(BAD_REQUEST, f"id: must be a string or an integer, got {_show(rid)}")
    reply_to = data.get("reply_to", msg.response_topic)
    if reply_to is not None and not valid_topic_name(reply_to):
        raise RequestError(BAD_REQUEST, "reply_to: not a valid topic name")
    if rid is None and msg.correlation_data is None:
        raise RequestError(BAD_REQUEST, "cancel/resend: needs 'id' or MQTT v5 correlation data")
    return Control(rid, msg.correlation_data, reply_to, pooled)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- replies ---------------------------------------------------------------------------------------
def _dump(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def chunk_payload(rid, seq: int, text: str) -> bytes:
    return _dump({"id": rid, "type": "chunk", "seq": seq, "text": text})


def done_payload(rid, seq: int, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                 timings: dict, **extra) -> bytes:
    """The final message of a completed request; `extra` fields (e.g. reasoning, parsed) go in when not None."""
    return _dump({"id": rid, "type": "done", "seq": seq, "text": text,
                  **{k: v for k, v in extra.items() if v is not None}, "finish_reason": finish_reason,
                  "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                  "timings": {k: round(v, 3) for k, v in timings.items()}})


def error_payload(rid, seq: int, code: str, message: str) -> bytes:
    return _dump({"id": rid, "type": "error", "seq": seq, "code": code, "message": message})


def status_payload(state: str, device: str, **info) -> bytes:
    return _dump({"state": state, "device": device, "protocol": VERSION, "time": round(time.time(), 3), **info})
