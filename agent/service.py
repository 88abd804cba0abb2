"""One running device agent: the MQTT transport, the AgentServer, telemetry and the systemd watchdog, and with
config.http the OpenAI-compatible HTTP API (agent/http_api.py) on the same AgentServer.

    agent = Agent(config)            # connects at once; status `loading` while the model loads (HTTP listens
                                     # at once too; its /health says 503 until serve)
    agent.serve(backend, tokenizer, info)   # requests taken; `online` and systemd's READY=1 once the broker
                                            # granted every subscription
    agent.wait()                     # until stop() (SIGTERM/SIGINT in the CLI)
    agent.stop()                     # running requests get shutdown_grace_s, status `offline`
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Optional

from agent.config import AgentConfig
from agent.errors import AgentInputError
from agent.health import Tegrastats, memory, sd_notify, watchdog_interval
from agent.mqtt_transport import MqttTransport
from agent.server import AgentServer

log = logging.getLogger("cpm-edge.agent")


class Agent:
    def __init__(self, config: AgentConfig, client_id: Optional[str] = None):
        self.config = config.validate()
        log.info("agent settings: %s", config.redacted())
        self.transport = MqttTransport(config, client_id=client_id)
        self.server: Optional[AgentServer] = None
        self.stopped = threading.Event()
        self.tegrastats = Tegrastats()
        self._threads: list[threading.Thread] = []
        self._ready_sent = False
        self.http = _http_api(self.config)  # before connecting: a port that cannot be bound is a bad setting
        self.transport.start()

    def serve(self, backend, tokenizer, info: Optional[dict] = None) -> AgentServer:
        info = dict(info or {})
        self.server = AgentServer(backend, tokenizer, self.config, info)
        self.server.start(self.transport)
        if self.http is not None:
            self.http.attach(self.server, info)
        status = {"max_batch": backend.max_batch, "max_seq": backend.max_seq, **_public(info),
                  "chat_template": tokenizer.chat_template_source}  # "checkpoint" or "chatml" (the fallback)
        self.transport.on_granted = self._granted
        self.transport.serve(self.server.handle)      # subscribe first: `online` is published after the SUBACK
        self.transport.set_state("online", **status)
        self.tegrastats.start()
        for target, name in ((self._telemetry, "cpm-telemetry"), (self._watchdog, "cpm-watchdog")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self.server

    def _granted(self):
        """Every subscription granted (network thread): tell systemd the agent is ready, once."""
        if not self._ready_sent:
            self._ready_sent = True
            sd_notify("READY=1")

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.stopped.wait(timeout)

    def stop(self):
        if self.stopped.is_set():
            return
        sd_notify("STOPPING=1")
        self.stopped.set()
        if self.server is not None:
            if not self.server.stop():
                log.error("the scheduler did not stop in time")
        if self.http is not None:
            self.http.stop()
        self.tegrastats.stop()
        self.transport.stop()
        for t in self._threads:
            t.join(2)

    # --- background loops (they wait on the stop event, never sleep-poll) ----------------------------
    def _telemetry(self):
        period = self.config.telemetry_s
        if period <= 0:
            return
        last_tokens, last_time = 0, time.monotonic()
        while not self.stopped.wait(period):
            stats = self.server.stats()
            now = time.monotonic()
            rate = (stats["tokens"] - last_tokens) / max(now - last_time, 1e-9)
            last_tokens, last_time = stats["tokens"], now
            report = {"time": round(time.time(), 3), "tokens_per_s": round(rate, 2),
                      "queue_depth": max(0, stats["outstanding"] - self.server.generator.active),
                      "active": self.server.generator.active, "max_batch": self.server.backend.max_batch,
                      "requests": {k: stats[k] for k in ("received", "accepted", "completed", "cancelled")},
                      "errors": stats["errors"], "controls_dropped": stats["controls_dropped"],
                      "memory": memory(), "connects": self.transport.connects}
            figures = self.tegrastats.figures()
            if figures:
                report["tegrastats"] = figures
            self.transport.publish(self.transport.topics.telemetry, json.dumps(report).encode())

    def _watchdog(self):
        interval = watchdog_interval()
        if interval is None:
            return
        while not self.stopped.wait(interval):
            if time.monotonic() - self.server.heartbeat < 2 * interval:  # the scheduler is alive
                sd_notify("WATCHDOG=1")
            else:
                log.error("scheduler stuck for %.0f s: not feeding the systemd watchdog",
                          time.monotonic() - self.server.heartbeat)


def _http_api(config: AgentConfig):
    """The HTTP API, listening, when config.http is set (aiohttp is imported only then)."""
    if config.http is None:
        return None
    try:
        from agent.http_api import HttpApi
    except ImportError as e:
        raise AgentInputError(f"--http: needs aiohttp ({e.name} is not importable): pip install aiohttp, or the "
                              f"kit with its agent extra") from None
    return HttpApi(config.http_address, config.read_api_key(), config.max_payload_bytes).start()


def _public(info: dict) -> dict:
    """Bundle facts safe to publish in the retained status (short scalars only). The status's own keys win:
    a bundle manifest's `device` (the profile it was made for) is published as `profile`."""
    facts = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200}
    if "device" in facts:
        facts["profile"] = facts.pop("device")
    return {k: v for k, v in facts.items() if k not in ("state", "protocol", "time")}
