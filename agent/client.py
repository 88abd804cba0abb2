"""A small Python client of the agent (what `cpm-edge ask` uses; other programs can too).

    with AgentClient("mqtt://broker:1883", "orin-01") as client:
        answer = client.ask("Which block?", max_tokens=64, on_text=print)
        pending = client.submit(messages=[{"role": "user", "content": "Hi"}])
        for text in pending.stream(timeout=30): ...
        pending.cancel()

MQTT v5 by default (ResponseTopic + CorrelationData); mqtt_version="3.1.1" puts reply_to and id in the
payload instead. After a reconnect the client asks the agent to resend the final message of every request
still waiting (the broker may have lost it), and resubmits a request the agent never received.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from paho.mqtt.packettypes import PacketTypes

from agent import protocol as P
from agent.config import check_name, parse_broker_url
from agent.mqtt_transport import make_client, v5_properties

NO_ANSWER = "no_answer"      # client-side codes, next to the agent's (protocol.ERROR_CODES)
CONNECTION = "connection"


class AgentError(Exception):
    """The agent answered an error, or none answered (code no_answer), or the broker refused (connection)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class Answer:
    id: str
    text: str
    finish_reason: str
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    parsed: Any = None               # the JSON value, when the request gave a response_format and it parsed
    reasoning: Optional[str] = None  # a thinking template's <think> part, apart from text


class Pending:
    """One request in flight; its reply messages arrive in `inbox` (from the network thread)."""

    def __init__(self, client: "AgentClient", rid: str, payload: dict):
        self.client, self.id, self.payload = client, rid, payload
        self.inbox: queue.Queue = queue.Queue()
        self.answer: Optional[Answer] = None
        self.error: Optional[AgentError] = None
        self.heard = False        # any reply at all (so `unknown_request` means the agent never got it)
        self.resubmitted = False
        self.expiry: Optional[float] = None  # v5: MessageExpiryInterval (3.1.1: "expiry" in the payload)
        self._next_seq = 0
        self._gap = False
        self._shown = ""

    def stream(self, timeout: float = 60.0) -> Iterator[str]:
        """Text as it arrives; raises AgentError on an error reply or when nothing comes for `timeout` s."""
        while self.answer is None:
            try:
                msg = self.inbox.get(timeout=timeout)
            except queue.Empty:
                self.client._forget(self)
                status = self.client.last_status
                seen = f" (its status: {status.get('state')})" if status else ""
                raise AgentError(NO_ANSWER, f"no answer from device {self.client.device!r} within {timeout:g} s"
                                            f"{seen}") from None
            seq = msg.get("seq", 0) if isinstance(msg.get("seq"), int) else 0
            kind = msg.get("type")
            if kind == "chunk":
                if seq < self._next_seq:
                    continue  # a duplicate after a reconnect
                if seq > self._next_seq:
                    self._gap = True  # a chunk was lost with the broker: the final text fills it in
                self._next_seq = seq + 1
                if not self._gap:
                    self._shown += msg.get("text", "")
                    yield msg.get("text", "")
            elif kind == "done":
                text = msg.get("text", "")
                self.answer = Answer(self.id, text, msg.get("finish_reason", ""), msg.get("usage", {}),
                                     msg.get("timings", {}), msg.get("parsed"), msg.get("reasoning"))
                self.client._forget(self)
                if text.startswith(self._shown) and len(text) > len(self._shown):
                    yield text[len(self._shown):]
            elif kind == "error":
                self.client._forget(self)
                self.error = AgentError(msg.get("code", "error"), msg.get("message", ""))
                raise self.error

    def result(self, timeout: float = 60.0) -> Answer:
        for _ in self.stream(timeout):
            pass
        return self.answer

    def cancel(self):
        self.client._publish_control("cancel", self)


class AgentClient:
    def __init__(self, broker: str, device: str, *, username: Optional[str] = None, password: Optional[str] = None,
                 ca_file: Optional[str] = None, cert_file: Optional[str] = None, key_file: Optional[str] = None,
                 mqtt_version: str = "5", prefix: str = "cpm/v1", pool: Optional[str] = None,
                 client_id: Optional[str] = None):
        self.address = parse_broker_url(broker)
        self.device = check_name(device, "--device")
        self.v5 = mqtt_version == "5"
        self.client_id = check_name(client_id or f"cpm-ask-{os.getpid()}-{os.urandom(3).hex()}", "client_id")
        self.topics = P.Topics(prefix, device)
        if pool is not None:
            check_name(pool, "--pool")
            base = f"{prefix}/pool/{pool}"
            self.request_topic, self.control_base = f"{base}/request", base
            self.reply_topic = f"{base}/reply/{self.client_id}"
        else:
            self.request_topic, self.control_base = self.topics.request, f"{prefix}/{device}"
            self.reply_topic = self.topics.reply_space(self.client_id)
        self.pending: dict[str, Pending] = {}
        self.last_status: Optional[dict] = None
        self._status_changed = threading.Condition()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._connected = threading.Event()
        self._refused: Optional[str] = None
        self._connects = 0
        self._resync = False
        self.mqtt = make_client(self.client_id, self.address, mqtt_version, username=username, password=password,
                                ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self.mqtt.reconnect_delay_set(0.2, 5)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_message = self._on_message

    # --- connection ---------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> "AgentClient":
        try:
            self.mqtt.connect_async(self.address.host, self.address.port, keepalive=30)
        except (OSError, ValueError) as e:
            raise AgentError(CONNECTION, f"cannot reach {self.address}: {e}") from None
        self.mqtt.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(min(0.1, max(deadline - time.monotonic(), 0))):
            if self._refused or time.monotonic() >= deadline:
                self.close()
                raise AgentError(CONNECTION, self._refused or f"no connection to {self.address} within "
                                                              f"{timeout:g} s")
        return self

    def close(self):
        self.mqtt.disconnect()
        self.mqtt.loop_stop()

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    # --- requests -----------------------------------------------------------------------------------
    def submit(self, prompt: Optional[str] = None, *, messages: Optional[list] = None, expiry: Optional[float] = None,
               **params) -> Pending:
        """Publish one request; params are the protocol's (max_tokens, temperature, top_p, top_k, seed, stop,
        stream, chat)."""
        rid = f"{self.client_id}-{next(self._ids)}"
        payload = {k: v for k, v in params.items() if v is not None}
        payload.update({"id": rid, "prompt": prompt} if messages is None else {"id": rid, "messages": messages})
        if not self.v5:
            payload["reply_to"] = self.reply_topic
            if expiry is not None:
                payload["expiry"] = expiry
        pending = Pending(self, rid, payload)
        pending.expiry = expiry
        with self._lock:
            self.pending[rid] = pending
        self._publish_request(pending)
        return pending

    def ask(self, prompt: Optional[str] = None, *, messages: Optional[list] = None,
            on_text: Optional[Callable[[str], None]] = None, timeout: float = 60.0, **params) -> Answer:
        pending = self.submit(prompt, messages=messages, **params)
        for text in pending.stream(timeout):
            if on_text:
                on_text(text)
        return pending.answer

    def status(self, timeout: float = 2.0) -> Optional[dict]:
        """The device's retained status (None if it never published one)."""
        deadline = time.monotonic() + timeout
        with self._status_changed:
            while self.last_status is None and time.monotonic() < deadline:
                self._status_changed.wait(max(deadline - time.monotonic(), 0))
        return self.last_status

    def wait_online(self, timeout: float = 30.0) -> bool:
        """Wait until the device's retained status says `online` (it may be `loading` a model first)."""
        with self._status_changed:
            return self._status_changed.wait_for(
                lambda: (self.last_status or {}).get("state") == "online", timeout)

    def _publish_request(self, pending: Pending):
        props = None
        if self.v5:
            expiry = pending.expiry
            props = v5_properties(PacketTypes.PUBLISH, ResponseTopic=self.reply_topic,
                                  CorrelationData=pending.id.encode(),
                                  MessageExpiryInterval=None if expiry is None else max(1, math.ceil(expiry)))
        self.mqtt.publish(self.request_topic, json.dumps(pending.payload), qos=1, properties=props)

    def _publish_control(self, kind: str, pending: Pending):
        body = {"id": pending.id, "reply_to": self.reply_topic}
        self.mqtt.publish(f"{self.control_base}/{kind}", json.dumps(body), qos=1)

    def _forget(self, pending: Pending):
        with self._lock:
            self.pending.pop(pending.id, None)

    # --- paho callbacks (network thread) ------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = f"broker {self.address} refused the connection: {reason_code}"
            return
        self._connects += 1
        self._resync = self._connects > 1
        subs = [(self.reply_topic, 1)] + ([(self.topics.status, 1)] if self.control_base.endswith(self.device)
                                          else [])
        client.subscribe(subs)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if reason_codes[0].is_failure:
            self._refused = f"broker {self.address} refused the subscription to {self.reply_topic}: " \
                            f"{reason_codes[0]}"
            return
        self._connected.set()
        if self._resync:
            self._resend_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()

    def _resend_all(self):
        """After a reconnect: ask for the finals the broker may have dropped while it was away."""
        with self._lock:
            waiting = list(self.pending.values())
        for pending in waiting:
            self._publish_control("resend", pending)

    def _on_message(self, client, userdata, msg):
        if msg.topic == self.topics.status:
            try:
                status = json.loads(msg.payload)
            except ValueError:
                return
            with self._status_changed:
                self.last_status = status if isinstance(status, dict) else None
                self._status_changed.notify_all()
            if self._resync and self.last_status and self.last_status.get("state") == "online":
                self._resync = False  # the agent is back and subscribed: ask once more
                self._resend_all()
            return
        try:
            reply = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(reply, dict):
            return
        with self._lock:
            pending = self.pending.get(str(reply.get("id")))
        if pending is None:
            return  # a duplicate of something already finished, or another client's
        if reply.get("type") == "error" and reply.get("code") == P.UNKNOWN_REQUEST:
            if not pending.heard and not pending.resubmitted:
                pending.resubmitted = True  # the agent never got it (lost with the broker): send it again
                self._publish_request(pending)
            return
        pending.heard = True
        pending.inbox.put(reply)

