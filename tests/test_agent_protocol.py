"""The agent without a broker: request validation, config, the scheduler (busy, expiry, cancel, batching,
failures, shutdown, resend) through a recording outbox, tegrastats parsing, systemd notify."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from agent import protocol as P
from agent.config import AgentConfig
from agent.errors import AgentInputError
from agent.health import parse_tegrastats, sd_notify
from agent.server import AgentServer
from mqtt_fixtures import EchoBackend

LIMITS = P.Limits(max_payload_bytes=2048, max_tokens=64, default_max_tokens=16, max_wait_s=60)


def inbound(payload, topic="cpm/v1/dev1/request", **props) -> P.Inbound:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return P.Inbound(topic, raw, **props)


# --- validation -------------------------------------------------------------------------------------
def test_v5_and_311_requests():
    r = P.parse_request(inbound({"prompt": "hi", "max_tokens": 5, "stop": "x"}, response_topic="r/1",
                                correlation_data=b"c1"), LIMITS)
    assert (r.target.topic, r.target.correlation_data, r.target.id) == ("r/1", b"c1", None)
    assert r.params.max_tokens == 5 and r.params.stop == ("x",) and r.stream
    r = P.parse_request(inbound({"id": 7, "reply_to": "r/2", "messages": [{"role": "user", "content": "a"}],
                                 "stream": False, "temperature": 0.5, "seed": 3}), LIMITS)
    assert (r.target.topic, r.target.id, r.stream, r.params.temperature) == ("r/2", 7, False, 0.5)
    assert r.params.max_tokens == 16  # the agent's default


@pytest.mark.parametrize("payload, code, names", [
    ({"id": "a", "reply_to": "r", "prompt": "x", "max_token": 3}, P.BAD_REQUEST, "max_token"),
    ({"id": "a", "reply_to": "r", "prompt": 3}, P.BAD_REQUEST, "prompt"),
    ({"id": "a", "reply_to": "r"}, P.BAD_REQUEST, "'prompt'"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "messages": []}, P.BAD_REQUEST, "exactly one"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "max_tokens": 65}, P.TOO_MANY_TOKENS, "max_tokens"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "max_tokens": 0}, P.BAD_REQUEST, "max_tokens"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "temperature": "hot"}, P.BAD_REQUEST, "temperature"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "top_p": 0}, P.BAD_REQUEST, "top_p"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "top_k": -1}, P.BAD_REQUEST, "top_k"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "seed": 1.5}, P.BAD_REQUEST, "seed"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "stop": [""]}, P.BAD_REQUEST, "stop"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "stream": "yes"}, P.BAD_REQUEST, "stream"),
    ({"id": "a", "reply_to": "r", "prompt": "x", "expiry": -1}, P.BAD_REQUEST, "expiry"),
])
def test_refusals_name_the_key_and_carry_the_reply_target(payload, code, names):
    with pytest.raises(P.RequestError) as e:
        P.parse_request(inbound(payload), LIMITS)
    assert e.value.code == code and names in e.value.message
    assert e.value.target.topic == "r" and e.value.target.id == "a"


def test_unanswerable_and_oversized():
    for payload in ({"prompt": "x"}, {"id": "a", "prompt": "x"}, {"reply_to": "r/#", "id": "a", "prompt": "x"},
                    {"reply_to": "r", "id": True, "prompt": "x"}):
        with pytest.raises(P.RequestError) as e:
            P.parse_request(inbound(payload), LIMITS)
        assert e.value.target is None and e.value.code == P.BAD_REQUEST
    with pytest.raises(P.RequestError) as e:
        P.parse_request(inbound(b"{not json", response_topic="r", correlation_data=b"z"), LIMITS)
    assert (e.value.code, e.value.target.correlation_data) == (P.BAD_JSON, b"z")
    with pytest.raises(P.RequestError) as e:
        P.parse_request(inbound({"prompt": "x" * 3000}, response_topic="r"), LIMITS)
    assert e.value.code == P.PAYLOAD_TOO_LARGE and "2048" in e.value.message


def test_expiry_is_the_earliest_of_property_payload_and_max_wait():
    r = P.parse_request(inbound({"prompt": "x", "expiry": 5}, response_topic="r", expiry_s=2,
                                received_at=100.0), LIMITS)
    assert r.deadline == 102.0
    r = P.parse_request(inbound({"prompt": "x"}, response_topic="r", received_at=100.0), LIMITS)
    assert r.deadline == 160.0


def test_control_matching():
    c = P.parse_control(inbound({"id": "a"}, "cpm/v1/dev1/cancel"), LIMITS)
    assert c.matches(P.ReplyTarget("r", None, "a")) and not c.matches(P.ReplyTarget("r", None, "b"))
    c = P.parse_control(inbound({}, "cpm/v1/dev1/cancel", correlation_data=b"k", response_topic="r"), LIMITS)
    assert c.matches(P.ReplyTarget("r", b"k")) and not c.matches(P.ReplyTarget("other", b"k"))
    with pytest.raises(P.RequestError):
        P.parse_control(inbound({}, "cpm/v1/dev1/cancel"), LIMITS)


def test_topics_and_fleet_subscriptions():
    t = P.Topics("cpm/v1", "dev1", pool="arm", group="g")
    subs = dict(t.subscriptions())
    assert subs["$share/g/cpm/v1/pool/arm/request"] == "request" and subs["cpm/v1/dev1/cancel"] == "cancel"
    assert t.kind_of("cpm/v1/pool/arm/request") == "request" and t.kind_of("cpm/v1/dev2/request") is None


# --- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, names", [
    ({"broker": "http://x"}, "--broker"), ({"broker": "mqtt://u:p@host"}, "credentials"),
    ({"device_id": "a/b"}, "--device-id"), ({"device_id": "a+"}, "--device-id"),
    ({"mqtt_version": "4"}, "--mqtt-version"), ({"pool": "p"}, "--fleet-group"),
    ({"ca_file": "/nonexistent", "broker": "mqtts://h"}, "--ca-file"),
    ({"ca_file": "/etc/hostname"}, "mqtts://"), ({"queue_size": 0}, "queue_size"),
    ({"password": "s3cret"}, "username"),
])
def test_config_errors_name_the_key(given, names):
    with pytest.raises(AgentInputError, match=names.replace("+", r"\+")):
        AgentConfig(**{"device_id": "dev1", **given}).validate()


def test_env_overrides_and_redaction():
    env = {"CPM_EDGE_BROKER": "mqtts://broker.lan:8884", "CPM_EDGE_MQTT_USERNAME": "orin",
           "CPM_EDGE_MQTT_PASSWORD": "s3cret", "CPM_EDGE_DEVICE_ID": "orin-01"}
    c = AgentConfig.from_sources(env=env, device_id="cli-wins").validate()
    assert (c.address.host, c.address.port, c.address.tls) == ("broker.lan", 8884, True)
    assert c.device_id == "cli-wins" and c.username == "orin" and c.password == "s3cret"
    assert "s3cret" not in repr(c) and "s3cret" not in json.dumps(c.redacted())


# --- the scheduler through a recording outbox --------------------------------------------------------
class Outbox:
    def __init__(self):
        self.messages, self.cond = [], threading.Condition()

    def publish(self, topic, payload, correlation_data=None, retain=False):
        with self.cond:
            self.messages.append((topic, json.loads(payload), correlation_data))
            self.cond.notify_all()

    def finals(self, n, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.of_type("done", "error")) >= n, timeout), self.messages
            return self.of_type("done", "error")

    def of_type(self, *kinds):
        return [m for _, m, _ in self.messages if m["type"] in kinds]


@pytest.fixture
def serve(tiny_tokenizer):
    servers = []

    def make(backend=None, **settings):
        config = AgentConfig(device_id="dev1", **settings).validate()
        server = AgentServer(backend or EchoBackend(), tiny_tokenizer, config)
        out = Outbox()
        server.start(out)
        servers.append(server)
        return server, out

    yield make
    for s in servers:
        s.stop(grace_s=0)


def req(rid, prompt="Hello robot", **fields):
    return inbound({"id": rid, "reply_to": f"r/{rid}", "prompt": prompt, **fields})


def test_answers_and_timings(serve):
    server, out = serve()
    server.handle(req("a", max_tokens=50))
    (final,) = out.finals(1)
    assert final["text"] == "Hello robot" and final["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == 6 and final["timings"]["ttft_ms"] >= 0
    chunks = out.of_type("chunk")
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert [c["seq"] for c in chunks] + [final["seq"]] == list(range(len(chunks) + 1))


def test_busy_when_rows_and_queue_are_full_and_every_request_is_answered(serve):
    server, out = serve(EchoBackend(max_batch=1, delay_s=0.02), queue_size=2)
    for i in range(6):
        server.handle(req(f"r{i}", "The robot arm picks up the red block."))
    finals = out.finals(6)
    codes = sorted(m.get("code", m.get("finish_reason")) for m in finals)
    assert codes.count("busy") == 3 and codes.count("stop") == 3
    assert server.stats()["outstanding"] == 0


def test_expired_requests_are_not_run(serve):
    server, out = serve(EchoBackend(max_batch=1, delay_s=0.02))
    server.handle(req("long", "The robot arm picks up the red block.", max_tokens=64))
    server.handle(req("late", expiry=0.05))
    finals = {m["id"]: m for m in out.finals(2)}
    assert finals["late"]["code"] == P.EXPIRED and finals["long"]["type"] == "done"


def test_cancel_lands_within_one_decode_step(serve):
    backend = EchoBackend(max_batch=2, delay_s=0.02, repeat=50)
    server, out = serve(backend)
    server.handle(req("c", "Hello robot", max_tokens=200))
    with out.cond:
        assert out.cond.wait_for(lambda: out.of_type("chunk"), 5)
    steps_before = len(backend.decode_sizes)
    server.handle(inbound({"id": "c"}, "cpm/v1/dev1/cancel"))
    (final,) = out.finals(1)
    assert final["finish_reason"] == "cancelled"
    assert len(backend.decode_sizes) - steps_before <= 2  # the step in progress, at most one more
    assert final["text"] == "".join(c["text"] for c in out.of_type("chunk"))


def test_concurrent_requests_share_decode_steps(serve):
    backend = EchoBackend(max_batch=4, delay_s=0.01)
    server, out = serve(backend)
    for i in range(4):
        server.handle(req(f"b{i}", "The robot arm picks up the red block."))
    assert all(m["text"] == "The robot arm picks up the red block." for m in out.finals(4))
    assert max(backend.decode_sizes) == 4


def test_prompt_limits_and_duplicates(serve):
    server, out = serve(EchoBackend(max_seq=32, delay_s=0.01))
    server.handle(req("big", "robot " * 40))
    server.handle(req("dup", "Hello robot " * 3))
    server.handle(req("dup", "Hello robot"))
    finals = out.finals(3)
    assert {m["code"] for m in finals if m["type"] == "error"} == {P.PROMPT_TOO_LONG, P.DUPLICATE_ID}


class FailingBackend(EchoBackend):
    def decode(self, tokens, positions):
        if self.fail:
            self.fail = False
            raise RuntimeError("CUDA error: an illegal memory access")
        return super().decode(tokens, positions)


def test_a_backend_failure_fails_the_batch_not_the_agent(serve):
    backend = FailingBackend()
    backend.fail = True
    server, out = serve(backend)
    server.handle(req("x"))
    (final,) = out.finals(1)
    assert final["code"] == P.INTERNAL and "RuntimeError" in final["message"]
    server.handle(req("y"))
    assert out.finals(2)[1]["text"] == "Hello robot"


def test_stop_ends_everything_with_an_answer(serve):
    server, out = serve(EchoBackend(max_batch=1, delay_s=0.02, repeat=50), queue_size=4)
    for i in range(3):
        server.handle(req(f"s{i}", max_tokens=200))
    assert server.stop(grace_s=0.05)
    finals = out.finals(3)
    assert [m["code"] for m in finals] == [P.SHUTTING_DOWN] * 3
    server.handle(req("after"))
    assert out.finals(4)[3]["code"] == P.SHUTTING_DOWN


def test_resend_repeats_the_final_or_says_unknown(serve):
    server, out = serve()
    server.handle(req("a"))
    first = out.finals(1)[0]
    server.handle(inbound({"id": "a", "reply_to": "r/a"}, "cpm/v1/dev1/resend"))
    server.handle(inbound({"id": "zz", "reply_to": "r/zz"}, "cpm/v1/dev1/resend"))
    finals = out.finals(3)
    assert finals[1] == first and finals[2]["code"] == P.UNKNOWN_REQUEST


# --- health ------------------------------------------------------------------------------------------
def test_parse_tegrastats_line():
    line = ("08-12-2024 10:20:30 RAM 3456/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
            "CPU [2%@729,1%@729,off,off] EMC_FREQ 3% GR3D_FREQ 61% cpu@47.5C gpu@46.5C tj@47.5C "
            "VDD_IN 4446mW/4400mW VDD_CPU_GPU_CV 484mW/480mW")
    f = parse_tegrastats(line)
    assert f["ram_used_mb"] == 3456 and f["ram_total_mb"] == 7620 and f["gpu_util_pct"] == 61
    assert f["temp_c"]["gpu"] == 46.5 and f["power"]["VDD_IN"] == {"now_mw": 4446, "avg_mw": 4400}
    assert f["cpu_util_pct"] == [2, 1]


def test_sd_notify_sends_to_the_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify("READY=1")
        s.settimeout(2)
        assert s.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


class HeartbeatRecorder:
    """A real backend whose calls record the scheduler's heartbeat at the moment they run."""

    def __init__(self, backend):
        self.backend, self.server, self.calls = backend, None, []
        self.max_batch, self.max_seq = backend.max_batch, backend.max_seq

    def prefill(self, row, ids, start=0):
        self.calls.append(("prefill", row, start, len(ids), self.server.heartbeat))
        return self.backend.prefill(row, ids, start)

    def decode(self, tokens, positions):
        self.calls.append(("decode", len(tokens), self.server.heartbeat))
        return self.backend.decode(tokens, positions)


def test_a_long_prompt_is_prefilled_in_chunks_with_a_heartbeat_every_step(serve, ort_export, tiny_tokenizer, seed):
    import math
    import random

    from agent.onnxruntime_backend import OnnxRuntimeBackend
    from mqtt_fixtures import words_prompt

    backend = HeartbeatRecorder(OnnxRuntimeBackend(ort_export("dense"), max_batch=2))
    server, out = serve(backend, prefill_chunk=32)
    backend.server = server
    assert server.prefill_chunk == 32
    server.handle(req("long", words_prompt(tiny_tokenizer, random.Random(seed), 450), max_tokens=2))
    (final,) = out.finals(1, timeout=60)
    assert final["type"] == "done", final
    prefills = [c for c in backend.calls if c[0] == "prefill"]
    n = final["usage"]["prompt_tokens"]
    assert n > 400 and [c[3] for c in prefills] == [32] * (n // 32) + ([n % 32] if n % 32 else [])
    assert [c[2] for c in prefills] == [32 * k for k in range(math.ceil(n / 32))]
    beats = [c[4] for c in prefills]
    assert all(a < b for a, b in zip(beats, beats[1:]))  # each chunk in a scheduler step of its own


def test_the_prefill_chunk_comes_from_the_settings_else_the_bundle(serve, monkeypatch, tiny_tokenizer):
    assert serve()[0].prefill_chunk == 512
    assert serve(prefill_chunk=64)[0].prefill_chunk == 64
    config = AgentConfig(device_id="dev1").validate()
    assert AgentServer(EchoBackend(), tiny_tokenizer, config, {"prefill_chunk": 128}).prefill_chunk == 128
    monkeypatch.setenv("CPM_EDGE_PREFILL_CHUNK", "256")
    assert AgentConfig.from_sources(device_id="dev1").validate().prefill_chunk == 256
    monkeypatch.setenv("CPM_EDGE_PREFILL_CHUNK", "lots")
    with pytest.raises(AgentInputError, match="CPM_EDGE_PREFILL_CHUNK"):
        AgentConfig.from_sources(device_id="dev1")
    with pytest.raises(AgentInputError, match="prefill_chunk"):
        AgentConfig(device_id="dev1", prefill_chunk=0).validate()


def test_the_device_profile_key_prefill_chunk():
    from export.profiles import ProfileError, load_profile, profile_from_dict, profile_paths

    for name in profile_paths():
        assert load_profile(name).prefill_chunk >= 1
    raw = {k: v for k, v in vars(load_profile("orin")).items() if k != "path"}
    assert profile_from_dict({**raw, "prefill_chunk": 256}, "p.yaml").prefill_chunk == 256
    with pytest.raises(ProfileError, match="prefill_chunk"):
        profile_from_dict({**raw, "prefill_chunk": 0}, "p.yaml")
    with pytest.raises(ProfileError, match="prefill_chunk"):
        profile_from_dict({**raw, "prefill_chunk": "512"}, "p.yaml")


def test_a_backend_without_a_start_position_prefills_whole_prompts(serve, caplog):
    class WholePrompts(EchoBackend):
        def prefill(self, row, ids):
            return super().prefill(row, ids)

    server, out = serve(WholePrompts(max_seq=256), prefill_chunk=4)
    assert server.prefill_chunk is None and "takes no start position" in caplog.text
    server.handle(req("w", "The robot arm picks up the red block."))
    assert out.finals(1)[0]["text"] == "The robot arm picks up the red block."
