"""Security against a real Mosquitto: a password file + per-device ACL (anonymous refused, another device's
topics refused) and TLS with a CA made in the test (server and client certificates)."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from agent.client import AgentClient, AgentError
from agent.config import AgentConfig
from agent.service import Agent
from mqtt_fixtures import EchoBackend

USERS = {"agent-dev1": "pw-agent-1", "agent-dev2": "pw-agent-2", "app1": "pw-app-1"}
ACL = """
user agent-dev1
topic read cpm/v1/dev1/request
topic read cpm/v1/dev1/cancel
topic read cpm/v1/dev1/resend
topic write cpm/v1/dev1/status
topic write cpm/v1/dev1/telemetry
topic write cpm/v1/dev1/reply/#

user agent-dev2
topic read cpm/v1/dev2/request
topic read cpm/v1/dev2/cancel
topic read cpm/v1/dev2/resend
topic write cpm/v1/dev2/status
topic write cpm/v1/dev2/telemetry
topic write cpm/v1/dev2/reply/#

user app1
topic write cpm/v1/dev1/request
topic write cpm/v1/dev1/cancel
topic write cpm/v1/dev1/resend
topic read cpm/v1/dev1/status
pattern read cpm/v1/dev1/reply/%c
"""


@pytest.fixture
def acl_broker(broker_factory, tmp_path):
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    pw = tmp_path / "passwords"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(pw), user, password],
                       check=True, capture_output=True)
    (tmp_path / "acl").write_text(ACL)
    return broker_factory(f"allow_anonymous false\npassword_file {pw}\nacl_file {tmp_path / 'acl'}")


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # bounded
        time.sleep(0.02)
    return predicate()


def test_acl_confines_each_device_and_client(acl_broker, run_agent, tiny_tokenizer):
    url = acl_broker.url
    run_agent(url, username="agent-dev1", password=USERS["agent-dev1"])
    dev2 = run_agent(url, device_id="dev2", username="agent-dev2", password=USERS["agent-dev2"])
    with AgentClient(url, "dev1", username="app1", password=USERS["app1"], client_id="app1-c") as app:
        assert app.ask("Hello robot", timeout=10).text == "Hello robot"
    # anonymous: refused at the door, with the broker's reason
    with pytest.raises(AgentError, match="connection.*[Nn]ot authori[sz]ed"):
        AgentClient(url, "dev1").connect(5)
    # app1 may neither publish to dev2 nor hear its replies: dev2's agent never sees the request
    with AgentClient(url, "dev2", username="app1", password=USERS["app1"], client_id="app1-c") as app:
        with pytest.raises(AgentError, match="no_answer"):
            app.ask("Hello robot", timeout=1.0)
    assert dev2.server.stats()["received"] == 0
    # an agent whose credentials do not cover the device it claims is told so (the broker refuses its status)
    bad = Agent(AgentConfig(broker=url, device_id="dev3", username="agent-dev1", password=USERS["agent-dev1"],
                            telemetry_s=0))
    try:
        bad.serve(EchoBackend(), tiny_tokenizer)
        assert wait_for(lambda: bad.transport.last_error is not None)
        assert "refused a publish" in bad.transport.last_error and "cpm/v1/dev3/status" in bad.transport.last_error
        assert USERS["agent-dev1"] not in bad.transport.last_error
    finally:
        bad.stop()
    anonymous = Agent(AgentConfig(broker=url, device_id="dev1", telemetry_s=0))
    try:
        assert wait_for(lambda: anonymous.transport.last_error is not None)
        assert "refused the connection" in anonymous.transport.last_error
    finally:
        anonymous.stop()


def make_ca(folder):
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, with the openssl CLI."""
    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cpm-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt", *ext)
    return {n: str(folder / n) for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_with_client_certificates(broker_factory, run_agent, tmp_path):
    certs = make_ca(tmp_path)
    broker = broker_factory(f"allow_anonymous true\ncafile {certs['ca.crt']}\ncertfile {certs['server.crt']}\n"
                            f"keyfile {certs['server.key']}\nrequire_certificate true", tls=True)
    assert broker.url.startswith("mqtts://")
    tls = dict(ca_file=certs["ca.crt"], cert_file=certs["client.crt"], key_file=certs["client.key"])
    run_agent(broker.url, **tls)
    with AgentClient(broker.url, "dev1", **tls) as client:
        assert client.ask("Hello robot", timeout=10).text == "Hello robot"
    with pytest.raises(AgentError, match="connection"):  # no client certificate: the handshake fails
        AgentClient(broker.url, "dev1", ca_file=certs["ca.crt"]).connect(3)


DYNSEC = "mosquitto_dynamic_security.so"


@pytest.fixture
def refusing_broker(broker_factory, tmp_path):
    """A Mosquitto whose dynamic-security plugin refuses subscriptions to cpm/v1/dev1/cancel (anyone else's
    subscriptions are granted): a real SUBACK with v5 reason 0x87 / v3.1.1 granted QoS 0x80."""
    import glob
    import json

    plugin = next(iter(glob.glob(f"/usr/lib/*/{DYNSEC}") + glob.glob(f"/usr/lib/{DYNSEC}")), None)
    if plugin is None:
        pytest.skip(f"{DYNSEC} not installed (Debian's mosquitto package ships it)")
    config = tmp_path / "dynsec.json"
    config.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": True,
                             "unsubscribe": True},
        "clients": [], "groups": [{"groupname": "anyone", "roles": [{"rolename": "no-cancel"}]}],
        "roles": [{"rolename": "no-cancel", "acls": [{"acltype": "subscribePattern", "topic": "cpm/v1/dev1/cancel",
                                                       "priority": 0, "allow": False}]}],
        "anonymousGroup": "anyone"}))
    return broker_factory(f"allow_anonymous true\nplugin {plugin}\nplugin_opt_config_file {config}")


def retained_status(port: int, device: str, timeout: float = 5.0) -> dict:
    """The retained status of a device, as a subscriber that comes later sees it."""
    import json
    import queue

    import paho.mqtt.client as mqtt

    got: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, ud, m: got.put(json.loads(m.payload))
    c.connect("127.0.0.1", port)
    c.subscribe(f"cpm/v1/{device}/status", qos=1)
    c.loop_start()
    try:
        return got.get(timeout=timeout)
    finally:
        c.loop_stop()
        c.disconnect()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_a_refused_subscription_is_an_error_and_never_online(refusing_broker, run_agent, version, caplog,
                                                            tmp_path, monkeypatch):
    import socket

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # stands in for systemd's notify socket
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    agent = run_agent(refusing_broker.url, mqtt_version=version)  # waits for the SUBACK
    transport = agent.transport
    assert not transport.subscribed_ok and transport.refused_topics == ["cpm/v1/dev1/cancel"]
    assert "refused the subscription to cpm/v1/dev1/cancel" in transport.last_error
    assert ("Not authorized" if version == "5" else "Unspecified error") in transport.last_error
    assert any(r.levelname == "ERROR" and "cpm/v1/dev1/cancel" in r.getMessage() for r in caplog.records)
    assert wait_for(lambda: retained_status(refusing_broker.port, "dev1")["state"] == "error")
    status = retained_status(refusing_broker.port, "dev1")
    assert "cpm/v1/dev1/cancel" in status["error"]
    transport.set_state("online")  # a later state change does not make it online either
    assert retained_status(refusing_broker.port, "dev1")["state"] == "error"
    with pytest.raises(TimeoutError):
        notify.recv(64)  # nor does systemd hear READY=1
    # the same broker grants every subscription of another device: that agent is online
    other = run_agent(refusing_broker.url, device_id="dev2", mqtt_version=version)
    assert other.transport.subscribed_ok and not other.transport.refused_topics
    assert wait_for(lambda: retained_status(refusing_broker.port, "dev2")["state"] == "online")
    assert notify.recv(64) == b"READY=1"
    notify.close()
