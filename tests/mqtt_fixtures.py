"""Fixtures for the agent tests: a real Mosquitto per test on a free loopback port, a cheap scripted backend.

Loaded through `pytest_plugins` by the test_agent_* modules. Each broker gets its own config in the test's
temp folder (set_tcp_nodelay true), is stopped by its pid, and only listens on 127.0.0.1.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed (make setup installs it "
                                                                "as root: apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """One broker process: start / kill / restart on the same port, with the config lines given."""

    def __init__(self, folder: Path, extra: str = "", port: int | None = None, tls: bool = False):
        self.folder, self.extra, self.tls = folder, extra, tls
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.conf = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        # As root, mosquitto would drop to user `mosquitto`, which cannot read the test's private temp folder.
        user = f"user {getpass.getuser()}\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{user}listener {self.port} 127.0.0.1\nset_tcp_nodelay true\nmax_queued_messages 0\n"
                             f"max_inflight_messages 0\n{self.extra}\n")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded: the broker listens within milliseconds
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def kill(self):
        self.stop(signal.SIGKILL)


@pytest.fixture
def broker_factory(tmp_path):
    """make(extra_config_lines, tls=False) -> a started Mosquitto; all are stopped after the test."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (make setup installs it as root: apt-get install mosquitto)")
    brokers = []

    def make(extra: str = "allow_anonymous true", tls: bool = False) -> Mosquitto:
        folder = tmp_path / f"broker{len(brokers)}"
        folder.mkdir()
        b = Mosquitto(folder, extra, tls=tls).start()
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture
def broker(broker_factory) -> Mosquitto:
    return broker_factory()


class EchoBackend:
    """Answers each prompt with its own tokens (after bos), then eos: an answer says whose prompt it was.

    `delay_s` makes each decode step take that long (to catch a stream mid-way); `decode_sizes` records how
    many rows every decode call carried (to see batching).
    """

    def __init__(self, vocab: int = 512, max_batch: int = 8, max_seq: int = 256, eos: int = 2, delay_s: float = 0.0,
                 repeat: int = 1):
        self.vocab, self.max_batch, self.max_seq, self.eos = vocab, max_batch, max_seq, eos
        self.delay_s, self.repeat = delay_s, repeat
        self.scripts: dict[int, list[int]] = {}
        self.prompts: dict[int, list[int]] = {}
        self.decode_sizes: list[int] = []
        self._onehot = np.full((vocab, vocab), -10.0, np.float32)
        np.fill_diagonal(self._onehot, 10.0)
        self._pause = threading.Event()

    def _next(self, row: int) -> int:
        script = self.scripts.get(row)
        return script.pop(0) if script else self.eos

    def prefill(self, row, ids, start=0):
        self.prompts[row] = self.prompts.get(row, [])[:start] + [int(i) for i in ids]  # chunks add up
        self.scripts[row] = self.prompts[row][1:] * self.repeat
        return self._onehot[self._next(row)]

    def decode(self, tokens, positions):
        self.decode_sizes.append(len(tokens))
        if self.delay_s:
            self._pause.wait(self.delay_s)  # simulated compute time
        return self._onehot[[self._next(r) for r in range(len(tokens))]]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dense):
    from agent.tokenizer import Tokenizer
    return Tokenizer(tiny_dense)


def words_prompt(tokenizer, rng, tokens: int) -> str:
    """A text of random words that encodes to about `tokens` tokens (at most that many)."""
    words = ["robot", "arm", "red", "block", "tray", "turns", "over", "camera", "sees", "the", "gripper", "slow"]
    text = ""
    while True:
        longer = f"{text} {rng.choice(words)}".strip()
        if len(tokenizer.encode(longer)) > tokens:
            return text
        text = longer


def steady_prompt(backend, tokenizer, rng, max_tokens: int) -> str:
    """A short prompt whose greedy answer runs the full max_tokens (no eos) on this backend."""
    from agent.generation import SamplingParams, generate

    for _ in range(50):
        text = words_prompt(tokenizer, rng, rng.randint(4, 12))
        (out,) = generate(backend, tokenizer, [tokenizer.encode(text)], [SamplingParams(max_tokens=max_tokens)])
        if out.finish_reason == "length":
            return text
    raise AssertionError("no prompt of 50 ran without eos")


@pytest.fixture(scope="session")
def ort_export(tiny_models, tmp_path_factory):
    """ort_export(variant, flavor) -> an fp32 export (max_seq 512) of a tiny model, made once per session; the
    trt flavor with its plugin nodes moved where ONNX Runtime computes them by the torch references."""
    from export.onnx_export import ExportOptions, export

    made = {}

    def get(variant: str = "dense", flavor: str = "portable"):
        if (variant, flavor) not in made:
            out = tmp_path_factory.mktemp("ort") / f"{variant}-{flavor}"
            made[variant, flavor] = export(ExportOptions(tiny_models[variant], out, flavor, max_seq=512))
            if flavor == "trt":
                from trt_plugins.onnxruntime_ops import graph_for_onnxruntime
                made[variant, flavor] = graph_for_onnxruntime(made[variant, flavor], out.with_name(out.name + "-ort"))
        return made[variant, flavor]
    return get


@pytest.fixture
def run_agent(tiny_tokenizer):
    """run_agent(broker_url, backend=None, **config) -> a serving Agent (stopped after the test)."""
    from agent.config import AgentConfig
    from agent.service import Agent

    agents = []

    def start(url: str, backend=None, device_id: str = "dev1", wait: bool = True, tokenizer=None, **settings):
        config = AgentConfig(broker=url, device_id=device_id, telemetry_s=settings.pop("telemetry_s", 0),
                             **settings)
        agent = Agent(config)
        agents.append(agent)
        agent.serve(backend or EchoBackend(), tokenizer or tiny_tokenizer, {"model": "echo"})
        if wait:
            assert agent.transport.subscribed.wait(10), agent.transport.last_error
        return agent

    yield start
    for a in agents:
        a.stop()


@pytest.fixture
def make_client():
    from agent.client import AgentClient

    clients = []

    def make(url: str, device: str = "dev1", **kwargs) -> AgentClient:
        c = AgentClient(url, device, **kwargs).connect(10)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
