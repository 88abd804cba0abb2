"""The agent against a real Mosquitto: v5 and 3.1.1 request/response, streaming order, cancel, status and
will, telemetry, fleet mode, and the mosquitto_rr example of docs/protocol.md."""
from __future__ import annotations

import json
import queue
import shutil
import subprocess

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_fixtures import EchoBackend

TEXT = "The robot arm picks up the red block, turns it over and places it on the tray."


def raw_client(url_port: int, version=mqtt.MQTTv5, topics=()) -> tuple[mqtt.Client, queue.Queue]:
    """A bare paho client subscribed to `topics`; its messages land in the returned queue."""
    inbox: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=version)
    c.on_message = lambda cl, ud, m: inbox.put(m)
    subscribed = queue.Queue()
    c.on_subscribe = lambda *a: subscribed.put(1)
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    if topics:
        c.subscribe([(t, 1) for t in topics])
        subscribed.get(timeout=5)
    return c, inbox


def payloads(inbox: queue.Queue, until_final=True, timeout=10):
    out = []
    while True:
        m = inbox.get(timeout=timeout)
        out.append(m)
        if until_final and json.loads(m.payload)["type"] in ("done", "error"):
            return out


def test_v5_response_topic_and_correlation_data(broker, run_agent):
    run_agent(broker.url)
    c, inbox = raw_client(broker.port, topics=["my/replies"])
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData = "my/replies", b"\x00corr\xff"
    c.publish("cpm/v1/dev1/request", json.dumps({"prompt": TEXT, "max_tokens": 100}), qos=1, properties=props)
    msgs = payloads(inbox)
    assert all(m.properties.CorrelationData == b"\x00corr\xff" for m in msgs)
    final = json.loads(msgs[-1].payload)
    assert final["text"] == TEXT and final["id"] is None and final["finish_reason"] == "stop"
    c.loop_stop()


def test_311_reply_to_and_id_in_the_payload(broker, run_agent):
    run_agent(broker.url)
    c, inbox = raw_client(broker.port, mqtt.MQTTv311, topics=["mcu/7/rx"])
    c.publish("cpm/v1/dev1/request", json.dumps({"id": "m-1", "reply_to": "mcu/7/rx", "prompt": TEXT,
                                                  "stream": False}), qos=1)
    (final,) = [json.loads(m.payload) for m in payloads(inbox)]  # stream false: one message
    assert final["id"] == "m-1" and final["text"] == TEXT
    c.loop_stop()


def test_streaming_order_and_chunking(broker, run_agent, make_client):
    run_agent(broker.url, chunk_tokens=4, chunk_ms=10_000)
    client = make_client(broker.url)
    pending = client.submit(TEXT, max_tokens=200)
    raw = []
    inbox = pending.inbox
    while True:
        m = inbox.get(timeout=10)
        raw.append(m)
        if m["type"] != "chunk":
            break
    chunks, final = raw[:-1], raw[-1]
    assert [m["seq"] for m in raw] == list(range(len(raw)))
    assert "".join(c["text"] for c in chunks) == final["text"] == TEXT
    n_tokens = final["usage"]["completion_tokens"]
    assert len(chunks) <= 1 + -(-(n_tokens - 1) // 4)  # the first token alone, then groups of 4


def test_both_versions_through_the_client_class(broker, run_agent, make_client):
    run_agent(broker.url)
    for version in ("5", "3.1.1"):
        client = make_client(broker.url, mqtt_version=version)
        got = []
        answer = client.ask(TEXT, on_text=got.append, max_tokens=200, timeout=10)
        assert answer.text == "".join(got) == TEXT and answer.usage["prompt_tokens"] > 10


def test_cancel_over_mqtt(broker, run_agent, make_client):
    backend = EchoBackend(delay_s=0.02, repeat=100)
    run_agent(broker.url, backend=backend, chunk_tokens=1)
    client = make_client(broker.url)
    pending = client.submit("Hello robot", max_tokens=500)
    stream = pending.stream(timeout=10)
    first = next(stream)
    pending.cancel()
    rest = list(stream)
    assert pending.answer.finish_reason == "cancelled"
    assert pending.answer.text == first + "".join(rest)
    assert pending.answer.usage["completion_tokens"] < 60  # a 500-token answer, stopped early


def test_errors_are_replies_and_the_agent_keeps_serving(broker, run_agent, make_client):
    run_agent(broker.url, max_payload_bytes=4096, max_tokens=32, default_max_tokens=32, max_prompt_tokens=20)
    c, inbox = raw_client(broker.port, topics=["e/#"])
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "e/v5"
    c.publish("cpm/v1/dev1/request", b"\xff\xfe not json", qos=1, properties=props)
    cases = [({"id": 1, "reply_to": "e/1", "prompt": "x" * 5000}, "payload_too_large"),
             ({"id": 2, "reply_to": "e/2", "prompt": "robot " * 30}, "prompt_too_long"),
             ({"id": 3, "reply_to": "e/3", "prompt": "x", "max_tokens": 33}, "too_many_tokens"),
             ({"id": 4, "reply_to": "e/4", "prompt": "x", "top_p": 2}, "bad_request")]
    for payload, _ in cases:
        c.publish("cpm/v1/dev1/request", json.dumps(payload), qos=1)
    got = {}
    for _ in range(len(cases) + 1):
        m = inbox.get(timeout=10)
        got[m.topic] = json.loads(m.payload)
    assert got["e/v5"]["code"] == "bad_json"
    for payload, code in cases:
        assert got[payload["reply_to"]]["code"] == code and got[payload["reply_to"]]["message"]
    assert make_client(broker.url).ask("Hello robot", timeout=10).text == "Hello robot"
    c.loop_stop()


def test_retained_status_will_and_telemetry(broker, run_agent):
    agent = run_agent(broker.url, telemetry_s=0.2)
    c, inbox = raw_client(broker.port, topics=["cpm/v1/dev1/status", "cpm/v1/dev1/telemetry"])
    seen = {}
    while seen.get("status", (None, {}))[1].get("state") != "online" or "telemetry" not in seen:
        m = inbox.get(timeout=10)
        seen[m.topic.rsplit("/", 1)[1]] = (m, json.loads(m.payload))
    status = seen["status"][1]
    assert status["max_batch"] == 8
    # A status published while this client was already subscribed arrives live (retain flag clear); a client
    # that subscribes now must get it as the retained message.
    late, late_inbox = raw_client(broker.port, topics=["cpm/v1/dev1/status"])
    retained = late_inbox.get(timeout=10)
    assert retained.retain and json.loads(retained.payload)["state"] == "online"
    late.loop_stop()
    tel = seen["telemetry"][1]
    assert {"tokens_per_s", "queue_depth", "memory", "requests"} <= set(tel) and tel["memory"]["rss_mb"] > 0
    agent.transport.client.socket().close()  # the connection dies without DISCONNECT: the broker sends the will
    states = []
    while states[-1:] != ["online"] or "offline" not in states:
        m = inbox.get(timeout=15)
        if m.topic.endswith("status"):
            states.append(json.loads(m.payload)["state"])
    assert states.index("offline") < len(states) - 1  # offline (will), then online after the reconnect
    c.loop_stop()


def test_clean_stop_publishes_offline(broker, run_agent):
    agent = run_agent(broker.url)
    agent.stop()
    c, inbox = raw_client(broker.port, topics=["cpm/v1/dev1/status"])
    m = inbox.get(timeout=5)
    assert m.retain and json.loads(m.payload)["state"] == "offline"
    c.loop_stop()


def test_fleet_shares_one_pool(broker, run_agent, make_client):
    agents = [run_agent(broker.url, device_id=f"arm-{i}", fleet_group="arms", pool="pick",
                        backend=EchoBackend(max_batch=2, delay_s=0.005)) for i in range(2)]
    client = make_client(broker.url, device="arm-0", pool="pick")
    pendings = [client.submit(f"{TEXT} {i}", max_tokens=200) for i in range(20)]
    assert [p.result(15).text for p in pendings] == [f"{TEXT} {i}" for i in range(20)]
    served = [a.server.stats()["completed"] for a in agents]
    assert sum(served) == 20 and min(served) > 0  # each request served once, by one of the two


@pytest.mark.skipif(shutil.which("mosquitto_rr") is None, reason="mosquitto-clients not installed")
def test_the_mosquitto_rr_example_of_the_docs(broker, run_agent):
    run_agent(broker.url)
    out = subprocess.run(["mosquitto_rr", "-p", str(broker.port), "-t", "cpm/v1/dev1/request", "-e",
                          "demo/replies/1", "-m", json.dumps({"prompt": TEXT, "stream": False}), "-W", "10"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == TEXT


def test_a_long_prompt_does_not_stall_the_others(broker, run_agent, ort_export, seed):
    """On the exported tiny model in ONNX Runtime, prefill 32 tokens a step: a ~400-token prompt and a short
    one sent together while a third answer streams. The short one's first token arrives before the long
    one's, the running stream keeps receiving chunks during the long prefill, and every answer is the one
    an unchunked run gives."""
    import random

    from agent.generation import SamplingParams, generate
    from agent.onnxruntime_backend import OnnxRuntimeBackend
    from agent.tokenizer import Tokenizer
    from mqtt_fixtures import steady_prompt, words_prompt

    export_dir = ort_export("dense")
    tok = Tokenizer(export_dir)
    rng = random.Random(seed)
    texts = {"run": steady_prompt(OnnxRuntimeBackend(export_dir, max_batch=1), tok, rng, 120),
             "long": words_prompt(tok, rng, 400), "short": words_prompt(tok, rng, 8)}
    max_tokens = {"run": 120, "long": 4, "short": 4}
    run_agent(broker.url, backend=OnnxRuntimeBackend(export_dir, max_batch=3), tokenizer=tok, prefill_chunk=32,
              chunk_tokens=1, chunk_ms=0)
    c, inbox = raw_client(broker.port, topics=["ch/#"])

    def send(rid):
        c.publish("cpm/v1/dev1/request", json.dumps({"id": rid, "reply_to": f"ch/{rid}", "prompt": texts[rid],
                                                      "max_tokens": max_tokens[rid], "temperature": 0}), qos=1)

    send("run")
    first = inbox.get(timeout=20)
    assert first.topic == "ch/run" and json.loads(first.payload)["type"] == "chunk", first.payload
    send("long")
    send("short")
    events, finals = [], {}
    while len(finals) < 3:
        m = inbox.get(timeout=30)
        msg = json.loads(m.payload)
        rid = m.topic.split("/")[1]
        events.append((rid, msg["type"]))
        if msg["type"] in ("done", "error"):
            finals[rid] = msg
    c.loop_stop()
    short_first = events.index(("short", "chunk"))
    long_first = next(i for i, (rid, _) in enumerate(events) if rid == "long")
    assert short_first < long_first, events
    during = [e for e in events[short_first:long_first] if e == ("run", "chunk")]
    assert len(during) >= 5, events  # ~400 / 32 steps of the long prefill, each decoding `run` too
    for rid, text in texts.items():
        (alone,) = generate(OnnxRuntimeBackend(export_dir, max_batch=1), tok, [tok.encode(text)],
                            [SamplingParams(max_tokens=max_tokens[rid])])
        assert finals[rid]["type"] == "done" and finals[rid]["text"] == alone.text, (rid, finals[rid])
