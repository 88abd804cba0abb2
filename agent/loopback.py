"""Two ways for `cpm-edge device-test` to reach the agent's server the way a client does.

  LocalMosquitto      a private Mosquitto on a free loopback port (set_tcp_nodelay, anonymous, 127.0.0.1 only),
                      stopped by its pid: the agent and AgentClient talk MQTT through it
  InProcessTransport  without a broker: the same interface MqttTransport offers AgentServer (publish) and the
                      same Inbound messages it hands to AgentServer.handle, with no network in between
"""
from __future__ import annotations

import getpass
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from agent import protocol as P
from agent.client import AgentError, Answer, NO_ANSWER


def mosquitto_binary() -> Optional[str]:
    found = shutil.which("mosquitto")
    return found or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalMosquitto:
    """A broker of our own for the duration of a test; `with LocalMosquitto() as url: ...`."""

    def __init__(self, binary: Optional[str] = None):
        self.binary = binary or mosquitto_binary()
        if self.binary is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.folder = Path(tempfile.mkdtemp(prefix="cpm-device-test-broker-"))
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> str:
        # As root, mosquitto would switch to user `mosquitto`, which cannot read our private folder.
        user = f"user {getpass.getuser()}\n" if os.geteuid() == 0 else ""
        conf = self.folder / "mosquitto.conf"
        conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                        f"persistence false\n")
        log = open(self.folder / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded: a broker listens within milliseconds
            if self.proc.poll() is not None:
                raise OSError(f"mosquitto exited: {(self.folder / 'mosquitto.log').read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self.url
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise OSError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout:g} s")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class InProcessTransport:
    """The server's outbox and inbox without a broker: publish() routes to subscribed callbacks by exact
    topic (reply topics have no wildcards); send() hands a message to the server as the MQTT thread would."""

    def __init__(self, on_message: Callable[[P.Inbound], None]):
        self.on_message = on_message
        self._subscribers: dict[str, list[Callable[[bytes], None]]] = {}
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, correlation_data: Optional[bytes] = None, retain: bool = False):
        with self._lock:
            callbacks = list(self._subscribers.get(topic, ()))
        for callback in callbacks:
            callback(payload)

    def subscribe(self, topic: str, callback: Callable[[bytes], None]):
        with self._lock:
            self._subscribers.setdefault(topic, []).append(callback)

    def send(self, topic: str, payload: bytes, response_topic: Optional[str] = None,
             correlation_data: Optional[bytes] = None):
        self.on_message(P.Inbound(topic=topic, payload=payload, response_topic=response_topic,
                                  correlation_data=correlation_data))


class InProcessClient:
    """AgentClient.ask over an InProcessTransport: same request payload, same replies, same Answer."""

    def __init__(self, transport: InProcessTransport, topics: P.Topics, client_id: str = "device-test"):
        self.transport, self.topics = transport, topics
        self.reply_topic = topics.reply_space(client_id)
        self.client_id = client_id
        self.replies: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        transport.subscribe(self.reply_topic, self.replies.put)

    def ask(self, prompt: str, *, on_text: Optional[Callable[[str], None]] = None, timeout: float = 60.0,
            **params) -> Answer:
        rid = f"{self.client_id}-{next(self._ids)}"
        body = {"id": rid, "prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        self.transport.send(self.topics.request, json.dumps(body).encode(), self.reply_topic, rid.encode())
        while True:
            try:
                msg = json.loads(self.replies.get(timeout=timeout))
            except queue.Empty:
                raise AgentError(NO_ANSWER, f"no answer within {timeout:g} s") from None
            if msg.get("id") != rid:
                continue  # a late reply to an earlier request
            if msg["type"] == "chunk" and on_text:
                on_text(msg["text"])
            elif msg["type"] == "done":
                return Answer(rid, msg["text"], msg["finish_reason"], msg["usage"], msg["timings"])
            elif msg["type"] == "error":
                raise AgentError(msg["code"], msg["message"])
