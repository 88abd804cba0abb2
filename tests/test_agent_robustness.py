"""Under load and faults, against a real Mosquitto: 64 clients x 20 requests with none lost, the broker killed
and restarted mid-stream, and 10,000 fuzzed payloads with the agent alive and answering afterwards."""
from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_fixtures import EchoBackend

TEXT = "The robot arm picks up the red block and turns it over"


def test_64_clients_x_20_requests_none_lost(broker, run_agent, make_client):
    agent = run_agent(broker.url, backend=EchoBackend(max_batch=16), queue_size=64)
    clients = [make_client(broker.url, mqtt_version="5" if i % 2 else "3.1.1") for i in range(64)]
    results: dict[tuple[int, int], str] = {}
    failures = []

    def work(i, client):
        try:
            for j in range(20):
                results[i, j] = client.ask(f"client {i} asks {j}", max_tokens=32, timeout=30).text
        except Exception as e:  # recorded and asserted on below
            failures.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]
    assert len(results) == 64 * 20
    assert all(text == f"client {i} asks {j}" for (i, j), text in results.items())
    stats = agent.server.stats()
    assert stats["completed"] == 64 * 20 and stats["outstanding"] == 0 and not stats["errors"]


def test_broker_killed_and_restarted_mid_stream(broker, run_agent, make_client):
    backend = EchoBackend(max_batch=4, delay_s=0.03, repeat=6)
    agent = run_agent(broker.url, backend=backend, chunk_tokens=2)
    clients = [make_client(broker.url), make_client(broker.url, mqtt_version="3.1.1")]
    pendings = [(c.submit(f"{TEXT} {i}", max_tokens=200), " ".join([f"{TEXT} {i}"] * 6))
                for i, c in enumerate(clients * 2)]
    streams = [p.stream(timeout=30) for p, _ in pendings]
    firsts = [next(s) for s in streams]  # every answer is streaming
    broker.kill()
    time.sleep(0.3)
    broker.start()
    for (p, expected), s, first in zip(pendings, streams, firsts):
        text = first + "".join(s)
        assert p.answer.text == text == expected and p.answer.finish_reason == "stop"
    assert agent.transport.connects >= 2
    assert clients[0].ask("Hello robot", timeout=10).text == " ".join(["Hello robot"] * 6)  # still serving


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                    st.text(max_size=40))
_json = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=12)
_keys = ["id", "reply_to", "prompt", "messages", "chat", "max_tokens", "temperature", "top_p", "top_k", "seed",
         "stop", "stream", "expiry", "bogus"]
_near_valid = st.fixed_dictionaries({}, optional={
    **{k: _json for k in _keys},
    "reply_to": st.sampled_from(["fz/a", "fz/+", "", "fz/#", "$SYS/x"]),
    "prompt": st.one_of(st.text(max_size=60), _scalar),
    "max_tokens": st.integers(-3, 40), "id": st.one_of(st.text(max_size=10), st.integers()),
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "robot", 1]),
                                                             "content": st.one_of(st.text(max_size=20), _scalar)}),
                         max_size=3)})
_payload = st.one_of(
    st.binary(max_size=200),
    _json.map(lambda v: json.dumps(v).encode()),
    _near_valid.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=100).map(lambda t: ('{"id": "x", "reply_to": "fz/t", "prompt": ' + t).encode("utf-8", "replace")),
)


def test_10000_fuzzed_payloads_leave_the_agent_alive_and_answering(broker, run_agent, make_client):
    agent = run_agent(broker.url, backend=EchoBackend(max_batch=8), max_tokens=8, default_max_tokens=8,
                      max_payload_bytes=4096, queue_size=32)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    sent = [0]

    @settings(max_examples=10_000, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(payload=_payload, v5=st.booleans(), corr=st.binary(max_size=8))
    def fuzz(payload, v5, corr):
        props = None
        if v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = "fz/v5", corr
        pub.publish("cpm/v1/dev1/request", payload, qos=0, properties=props)
        sent[0] += 1

    fuzz()
    deadline = time.monotonic() + 60
    while agent.server.stats()["received"] < sent[0] and time.monotonic() < deadline:  # bounded wait
        time.sleep(0.05)
    pub.loop_stop()
    stats = agent.server.stats()
    assert sent[0] >= 9_000 and stats["received"] == sent[0]
    assert agent.server._thread.is_alive() and agent.transport.connected.is_set()
    assert make_client(broker.url).ask(TEXT, max_tokens=8, timeout=20).text == \
        make_client(broker.url).ask(TEXT, max_tokens=8, timeout=20).text != ""
    deadline = time.monotonic() + 20
    while agent.server.outstanding and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.server.outstanding == 0  # everything accepted was answered


def test_a_flood_of_cancels_and_resends_loses_no_request(broker, run_agent, make_client, seed):
    """6,000 cancel/resend messages (QoS 0, as fast as paho sends them) with 60 requests among them: every
    request gets exactly one final (done, cancelled or error), the control queue overflowed and was counted,
    every slot is released, and a full load of requests is served right after."""
    import random

    rng = random.Random(seed)
    backend = EchoBackend(max_batch=4, delay_s=0.05)  # slow steps: the flood outruns the scheduler
    agent = run_agent(broker.url, backend=backend, queue_size=16, control_queue_size=32)
    finals: dict[str, list] = {}
    after_final: list = []
    lock = threading.Lock()

    def on_message(client, userdata, m):
        msg = json.loads(m.payload)
        rid = m.topic.split("/", 1)[1]
        with lock:
            if rid in finals:
                after_final.append((rid, msg))
            elif msg["type"] in ("done", "error"):
                finals[rid] = msg

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("fl/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    time.sleep(0.3)  # the subscription is in place (its SUBACK is not awaited by paho's subscribe)
    ids = [f"q{i}" for i in range(60)]
    for rid in ids:
        pub.publish("cpm/v1/dev1/request", json.dumps({"id": rid, "reply_to": f"fl/{rid}", "prompt": f"{TEXT} {rid}",
                                                       "max_tokens": 16}), qos=1)
        for k in range(100):
            target = rng.choice(ids) if rng.random() < 0.3 else f"nobody{rng.randrange(10**6)}"
            if k % 2:
                pub.publish("cpm/v1/dev1/cancel", json.dumps({"id": target}), qos=0)
            else:  # a resend answers on its own reply topic: never a second final on a request's topic
                pub.publish("cpm/v1/dev1/resend", json.dumps({"id": target, "reply_to": f"rs/{k}"}), qos=0)
    deadline = time.monotonic() + 60
    while len(finals) < len(ids) and time.monotonic() < deadline:  # bounded wait for the answers
        time.sleep(0.05)
    time.sleep(0.5)  # anything sent after a final would arrive by now
    sub.loop_stop()
    pub.loop_stop()
    assert sorted(finals) == sorted(ids) and not after_final, (len(finals), after_final[:3])
    stats = agent.server.stats()
    assert stats["controls_dropped"] > 0, stats  # the flood did overflow the control queue
    kinds = {(m["type"], m.get("finish_reason", m.get("code"))) for m in finals.values()}
    assert kinds <= {("done", "stop"), ("done", "length"), ("done", "cancelled"), ("error", "busy")}, kinds
    answered = sum(m["type"] == "done" for m in finals.values())
    assert stats["accepted"] == answered and stats["outstanding"] == 0
    assert agent.server.generator.active == 0 and not agent.server.jobs
    clients = [make_client(broker.url) for _ in range(2)]
    pendings = [clients[i % 2].submit(f"after {i}", max_tokens=16) for i in range(agent.server.capacity)]
    answers = [p.result(30) for p in pendings]  # none refused busy: every slot was free again
    assert all(a.text.startswith(f"after {i}") for i, a in enumerate(answers))
