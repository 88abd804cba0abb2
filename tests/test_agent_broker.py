"""The embedded MQTT 3.1.1 broker (the demo's fallback): QoS 0/1, retained, wills, wildcards, and the agent
with its client running over it."""
from __future__ import annotations

import json
import queue

import paho.mqtt.client as mqtt
import pytest

from agent.broker import EmbeddedBroker, topic_matches


@pytest.fixture
def embedded():
    broker = EmbeddedBroker("127.0.0.1", 0)
    port = broker.start()
    yield port
    broker.stop()


def client(port, topics=(), will=None, version=mqtt.MQTTv311):
    inbox, acks = queue.Queue(), queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=version)
    c.on_message = lambda cl, ud, m: inbox.put(m)
    c.on_subscribe = lambda *a: acks.put(a[3])
    c.on_connect = lambda cl, ud, flags, rc, props: acks.put(rc)
    if will:
        c.will_set(*will, qos=1, retain=True)
    c.connect("127.0.0.1", port)
    c.loop_start()
    rc = acks.get(timeout=5)
    if rc.is_failure:
        c.loop_stop()
        return c, rc
    if topics:
        c.subscribe([(t, 1) for t in topics])
        acks.get(timeout=5)
    return c, inbox


def test_topic_matching():
    assert topic_matches("a/+/c", "a/b/c") and topic_matches("a/#", "a") and topic_matches("#", "a/b")
    assert not topic_matches("a/+", "a/b/c") and not topic_matches("#", "$SYS/x") and not topic_matches("a/b", "a")


def test_qos_retained_wildcards_and_will(embedded):
    pub, _ = client(embedded)
    pub.publish("dev/1/status", "online", qos=1, retain=True).wait_for_publish(5)
    sub, inbox = client(embedded, ["dev/+/status", "dev/#"])
    first = inbox.get(timeout=5)
    assert (first.topic, first.payload, first.retain) == ("dev/1/status", b"online", True)
    inbox.get(timeout=5)  # the same retained message through the second filter
    for qos in (0, 1):
        pub.publish("dev/1/data", f"q{qos}", qos=qos)
        m = inbox.get(timeout=5)  # overlapping filters: one delivery, at the highest granted QoS
        assert (m.payload, m.qos) == (f"q{qos}".encode(), qos)
    dying, _ = client(embedded, will=("dev/9/status", "offline"))
    dying.socket().close()  # no DISCONNECT: the will goes out
    m = inbox.get(timeout=5)
    assert (m.topic, m.payload) == ("dev/9/status", b"offline") and inbox.empty()
    for c in (pub, sub, dying):
        c.loop_stop()


def test_mqtt5_connect_is_refused(embedded):
    c, rc = client(embedded, version=mqtt.MQTTv5)
    assert rc.is_failure


def test_agent_and_client_over_the_embedded_broker(embedded, run_agent, make_client):
    url = f"mqtt://127.0.0.1:{embedded}"
    run_agent(url, mqtt_version="3.1.1")
    c = make_client(url, mqtt_version="3.1.1")
    assert c.ask("Hello robot", timeout=10).text == "Hello robot"
    assert c.status()["state"] == "online"
