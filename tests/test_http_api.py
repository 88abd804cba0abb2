"""The OpenAI-compatible HTTP API (agent/http_api.py) against the real `openai` client and the real curl, on a
loopback socket, beside a real Mosquitto: answers equal what the scheduler computes alone, OpenAI's error
bodies and statuses, the API key, health, SSE framing, one batch shared with MQTT, and no row left behind by a
client that goes away."""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from mqtt_fixtures import EchoBackend, steady_prompt, words_prompt

MESSAGES = [{"role": "system", "content": "You steer a robot arm."},
            {"role": "user", "content": "Which block do you pick up first?"}]


@pytest.fixture(scope="module")
def tiny(ort_export):
    """The tiny random-weight MiniCPM4, exported and run by ONNX Runtime, and its tokenizer."""
    from agent.tokenizer import Tokenizer

    export_dir = ort_export("dense")
    return export_dir, Tokenizer(export_dir)


@pytest.fixture
def http_agent(broker, run_agent, tiny):
    """http_agent(backend=None, **settings) -> (agent, base URL): an Agent on Mosquitto and on 127.0.0.1:<free>."""
    from agent.onnxruntime_backend import OnnxRuntimeBackend

    def start(backend=None, tokenizer=None, **settings):
        agent = run_agent(broker.url, backend=backend or OnnxRuntimeBackend(tiny[0], max_batch=2),
                          tokenizer=tokenizer or tiny[1], http="127.0.0.1:0", **settings)
        return agent, f"http://127.0.0.1:{agent.http.port}"
    return start


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def alone(tiny, ids, **params):
    """What the generation loop gives for this prompt with no server around it (the expectation)."""
    from agent.generation import SamplingParams, generate
    from agent.onnxruntime_backend import OnnxRuntimeBackend

    (out,) = generate(OnnxRuntimeBackend(tiny[0], max_batch=1), tiny[1], [ids], [SamplingParams(**params)])
    return out


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one plain request (urllib: to send what the openai client never would)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():  # bounded: the scheduler frees a row within a step or two
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_chat_and_completions_streamed_and_not(http_agent, tiny):
    agent, base = http_agent()
    api = client(base)
    expected = alone(tiny, tiny[1].encode_chat(MESSAGES), max_tokens=12)
    whole = api.chat.completions.create(model=agent.http.model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert whole.usage.prompt_tokens == expected.prompt_tokens
    assert whole.usage.completion_tokens == len(expected.token_ids)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(api.chat.completions.create(model=agent.http.model, messages=MESSAGES, max_tokens=12,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)

    prompt = "The robot arm picks up the red block and"
    expected = alone(tiny, tiny[1].encode(prompt), max_tokens=10)
    done = api.completions.create(model=agent.http.model, prompt=prompt, max_tokens=10, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text == expected.text
    streamed = list(api.completions.create(model=agent.http.model, prompt=prompt, max_tokens=10, temperature=0,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason == expected.finish_reason


def test_max_tokens_stop_and_seed(http_agent, tiny, seed):
    agent, base = http_agent()
    api = client(base)
    prompt = "Robot, report the tray:"
    ids = tiny[1].encode(prompt)
    greedy = alone(tiny, ids, max_tokens=24)
    short = api.completions.create(model=agent.http.model, prompt=prompt, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens <= 3
    assert short.choices[0].finish_reason == ("length" if len(greedy.token_ids) > 3 else "stop")
    chat_short = api.chat.completions.create(model=agent.http.model, messages=MESSAGES, max_completion_tokens=2,
                                             temperature=0)
    assert chat_short.usage.completion_tokens <= 2

    text = greedy.text
    rng = random.Random(seed)
    visible = [i for i in range(4, len(text) - 3) if not text[i:i + 3].isspace()]
    if visible:  # a random model may say little: stop at a piece from the middle of its answer
        at = rng.choice(visible)
        stop = text[at:at + 3]
        out = api.completions.create(model=agent.http.model, prompt=prompt, max_tokens=24, temperature=0,
                                     stop=[stop])
        assert out.choices[0].text == text[:text.index(stop)] and out.choices[0].finish_reason == "stop"

    s = rng.randrange(2 ** 31)
    sampled = [api.completions.create(model=agent.http.model, prompt=prompt, max_tokens=16, temperature=1.0,
                                      top_p=0.95, seed=s).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] == alone(tiny, ids, max_tokens=16, temperature=1.0, top_p=0.95, seed=s).text


def test_openai_errors(http_agent):
    agent, base = http_agent(max_payload_bytes=4096, max_tokens=64, default_max_tokens=32)
    api = client(base)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=agent.http.model, messages=MESSAGES, n=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=agent.http.model, messages=MESSAGES, max_tokens=65)
    assert e.value.body["code"] == "too_many_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=agent.http.model, messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["code"] == "bad_request" and "messages[0]" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"

    url = f"{base}/v1/chat/completions"
    status, body = http("POST", url, b'{"messages": [', {"Content-Type": "application/json"})
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "bad_json" and body["error"]["type"] == "invalid_request_error"
    status, body = http("POST", url, json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode())
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    status, body = http("GET", f"{base}/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = http("GET", url)
    assert status == 405 and "error" in body
    assert agent.server.stats()["outstanding"] == 0


def test_api_key(http_agent, tmp_path):
    key_file = tmp_path / "api.key"
    key_file.write_text("k-" + "%032x\n" % random.getrandbits(128))
    agent, base = http_agent(api_key_file=str(key_file))
    key = key_file.read_text().strip()
    assert client(base, key).models.list().data[0].id == agent.http.model
    for wrong in (key[:-1], key + "0", "Bearer", "k-" + "0" * 32):
        with pytest.raises(openai.AuthenticationError) as e:
            client(base, wrong).chat.completions.create(model=agent.http.model, messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, body = http("POST", f"{base}/v1/completions", json.dumps({"prompt": "hi"}).encode())
    assert status == 401 and body["error"]["type"] == "invalid_request_error"
    assert http("GET", f"{base}/health")[0] == 200  # health needs no key: it tells only whether it serves


def test_health_and_models(broker, tiny, tmp_path):
    """503 while the model loads and once the scheduler stops; 200 only while it serves."""
    from agent.config import AgentConfig
    from agent.onnxruntime_backend import OnnxRuntimeBackend
    from agent.service import Agent

    agent = Agent(AgentConfig(broker=broker.url, device_id="dev1", telemetry_s=0, http="127.0.0.1:0"))
    try:
        base = f"http://127.0.0.1:{agent.http.port}"
        assert http("GET", f"{base}/health") == (503, {"status": "loading"})
        status, body = http("POST", f"{base}/v1/completions", json.dumps({"prompt": "hi"}).encode())
        assert status == 503 and body["error"]["type"] == "server_error"
        agent.serve(OnnxRuntimeBackend(tiny[0], max_batch=1), tiny[1], {"model": "MiniCPM4-tiny"})
        status, body = http("GET", f"{base}/health")
        assert status == 200 and body["status"] == "ok"
        listed = client(base).models.list()
        assert [m.id for m in listed.data] == ["MiniCPM4-tiny"]
        assert client(base).models.retrieve("MiniCPM4-tiny").id == "MiniCPM4-tiny"
        assert agent.server.stop(grace_s=0)
        assert http("GET", f"{base}/health") == (503, {"status": "stopping"})
    finally:
        agent.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed (make setup installs it as root)")
def test_curl_streams_server_sent_events(http_agent, tiny):
    agent, base = http_agent()
    expected = alone(tiny, tiny[1].encode_chat(MESSAGES), max_tokens=8)
    out = subprocess.run(["curl", "-sSN", "--max-time", "30", f"{base}/v1/chat/completions",
                          "-H", "Content-Type: application/json",
                          "-d", json.dumps({"model": agent.http.model, "messages": MESSAGES, "max_tokens": 8,
                                            "temperature": 0, "stream": True})],
                         capture_output=True, text=True, timeout=40)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert all(lines[i + 1] == "" for i, line in enumerate(lines) if line)  # each event ends with a blank line
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason


class RecordingBackend:
    """Wraps the real ONNX Runtime backend and only records: which prompt owns each row (from its prefill)
    and, for every decode call, the rows it carried and their positions. The wrapped backend computes every
    logit; nothing is changed or faked.

    `hold_until` (a callable) holds each decode call, for at most 30 s, until it returns True once: a tiny
    model decodes 60 tokens in well under a second, so on a loaded machine the first request could finish
    before the second one reaches the server. Holding changes when a step runs, never what it computes."""

    def __init__(self, backend):
        self.backend, self.max_batch, self.max_seq = backend, backend.max_batch, backend.max_seq
        self.owner: dict[int, tuple] = {}
        self.decodes: list[list[tuple]] = []   # per call: (prompt ids of the row, position) for each row
        self.hold_until = None

    def prefill(self, row, ids, start=0):
        if start == 0:
            self.owner[row] = ()
        self.owner[row] += tuple(int(i) for i in ids)
        return self.backend.prefill(row, ids, start=start)

    def decode(self, tokens, positions):
        self.decodes.append([(self.owner.get(r), int(positions[r])) for r in range(len(tokens))])
        return self.backend.decode(tokens, positions)


def test_mqtt_and_http_requests_share_a_decode_step(http_agent, broker, make_client, tiny, seed):
    from agent.onnxruntime_backend import OnnxRuntimeBackend

    rng = random.Random(seed)
    tok = tiny[1]
    texts = {"mqtt": steady_prompt(OnnxRuntimeBackend(tiny[0], max_batch=1), tok, rng, 60)}
    texts["http"] = words_prompt(tok, rng, 10)
    backend = RecordingBackend(OnnxRuntimeBackend(tiny[0], max_batch=2))
    agent, base = http_agent(backend=backend)
    backend.hold_until = lambda: agent.server.outstanding >= 2   # both accepted: the HTTP one is queued
    mqtt_answer = make_client(broker.url).submit(texts["mqtt"], max_tokens=60, temperature=0)
    http_answer = client(base).completions.create(model=agent.http.model, prompt=texts["http"], max_tokens=20,
                                                  temperature=0)
    mqtt_text = mqtt_answer.result(30).text
    ids = {k: tuple(tok.encode(t)) for k, t in texts.items()}
    shared = [call for call in backend.decodes
              if {(owner, pos >= len(owner)) for owner, pos in call} >= {(ids["mqtt"], True), (ids["http"], True)}]
    assert shared, "no decode step carried both requests"
    assert mqtt_text == alone(tiny, list(ids["mqtt"]), max_tokens=60).text
    assert http_answer.choices[0].text == alone(tiny, list(ids["http"]), max_tokens=20).text


def test_client_disconnect_frees_the_row(http_agent, tiny_tokenizer):
    """A stream closed after two chunks, and a non-streamed request whose client times out while it waits:
    both are cancelled in the scheduler (scripted backend: a 500-token answer at 20 ms a step)."""
    backend = EchoBackend(delay_s=0.02, repeat=100)
    agent, base = http_agent(backend=backend, tokenizer=tiny_tokenizer, chunk_tokens=1, max_tokens=500)
    api = client(base)
    stream = api.chat.completions.create(model=agent.http.model, messages=MESSAGES, max_tokens=500, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert agent.server.outstanding == 1
    stream.close()
    wait_until(lambda: agent.server.outstanding == 0 and agent.server.generator.active == 0)
    assert agent.server.stats()["cancelled"] == 1 and len(backend.decode_sizes) < 200

    impatient = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=agent.http.model, prompt="Hello robot", max_tokens=500)
    wait_until(lambda: agent.server.outstanding == 0 and agent.server.generator.active == 0)
    assert agent.server.stats()["cancelled"] == 2


def test_shutdown_ends_a_stream_with_an_error_event(http_agent, tiny_tokenizer):
    """SIGTERM's path (AgentServer.stop, no grace): a running stream gets `data: {"error": ...}` (the openai
    client raises it) and a new request is 503 shutting_down."""
    backend = EchoBackend(delay_s=0.02, repeat=100)
    agent, base = http_agent(backend=backend, tokenizer=tiny_tokenizer, chunk_tokens=1, max_tokens=500)
    api = client(base)
    chunks = iter(api.completions.create(model=agent.http.model, prompt="Hello robot", max_tokens=500, stream=True))
    next(chunks)
    stopper = threading.Thread(target=agent.server.stop, kwargs={"grace_s": 0})
    stopper.start()
    with pytest.raises(openai.APIError) as e:
        for _ in chunks:
            pass
    stopper.join(10)
    assert e.value.body["code"] == "shutting_down"
    status, body = http("POST", f"{base}/v1/completions", json.dumps({"prompt": "hi"}).encode())
    assert status == 503 and body["error"]["code"] == "shutting_down"
    assert agent.server.outstanding == 0


def test_busy_is_429(http_agent, broker, make_client, tiny_tokenizer):
    """MQTT and HTTP requests count against one capacity (max_batch + queue_size)."""
    backend = EchoBackend(max_batch=1, delay_s=0.02, repeat=100)
    agent, base = http_agent(backend=backend, tokenizer=tiny_tokenizer, queue_size=1, max_tokens=500)
    mqtt = make_client(broker.url)
    holders = [mqtt.submit("Hello robot", max_tokens=500) for _ in range(2)]  # one decoding, one queued: full
    wait_until(lambda: agent.server.outstanding == 2)
    with pytest.raises(openai.RateLimitError) as e:
        client(base).completions.create(model=agent.http.model, prompt="Hello robot", max_tokens=5)
    assert e.value.status_code == 429 and e.value.body["code"] == "busy"
    assert e.value.response.headers["Retry-After"] == "1"
    for pending in holders:
        pending.cancel()
    wait_until(lambda: agent.server.outstanding == 0)


def test_reply_buffer_cancels_a_client_that_stops_reading():
    """_Reply, the scheduler -> event loop hand-off: past MAX_UNREAD unread payloads it cancels, once, and
    keeps every payload (the final message too) without ever blocking its caller."""
    from agent.http_api import MAX_UNREAD, _Reply

    async def main():
        reply = _Reply(asyncio.get_running_loop())
        cancels = []
        reply.cancel = lambda: cancels.append(1) or True
        sender = threading.Thread(target=lambda: [reply(json.dumps({"type": "chunk", "text": str(i)}).encode())
                                                  for i in range(MAX_UNREAD + 10)])
        sender.start()
        sender.join(5)
        assert not sender.is_alive() and cancels == [1]
        got = [await reply.next() for _ in range(MAX_UNREAD + 10)]
        assert [m["text"] for m in got] == [str(i) for i in range(MAX_UNREAD + 10)]

    asyncio.run(main())


def test_bad_http_settings_exit_2(tmp_path):
    from test_agent_cli import run

    out = run("agent", "--bundle", str(tmp_path), "--device-id", "dev1", "--http", "localhost")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--http" in out.stderr
    missing = tmp_path / "no.key"
    out = run("agent", "--bundle", str(tmp_path), "--device-id", "dev1", "--http", "127.0.0.1:0",
              "--api-key-file", str(missing))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and str(missing) in out.stderr


def test_a_port_in_use_is_a_bad_setting():
    import socket

    from agent.config import parse_http_address
    from agent.errors import AgentInputError
    from agent.http_api import HttpApi

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(AgentInputError, match=f"--http {address}: cannot listen"):
            HttpApi(parse_http_address(address)).start()


def test_the_agent_command_serves_http_and_stops_on_sigterm(broker, tiny, tmp_path):
    """`cpm-edge agent --bundle EXPORT --http ... --api-key-file ...` as a user runs it (ONNX Runtime backend)."""
    import os
    import signal

    from mqtt_fixtures import free_port
    from test_agent_cli import CPM, ROOT

    key_file = tmp_path / "api.key"
    key_file.write_text("%032x" % random.getrandbits(128))
    port = free_port()
    proc = subprocess.Popen(CPM + ["agent", "--bundle", str(tiny[0]), "--broker", broker.url, "--device-id", "dev1",
                                   "--telemetry", "0", "--max-batch", "1", "--http", f"127.0.0.1:{port}",
                                   "--api-key-file", str(key_file)],
                            cwd=ROOT, env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    try:
        def serving():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return http("GET", f"http://127.0.0.1:{port}/health")[0] == 200
            except OSError:  # not listening yet
                return False
        wait_until(serving, timeout=60)
        api = client(f"http://127.0.0.1:{port}", key_file.read_text())
        answer = api.completions.create(model=api.models.list().data[0].id, prompt="Hello robot", max_tokens=4,
                                        temperature=0)
        assert answer.choices[0].text == alone(tiny, tiny[1].encode("Hello robot"), max_tokens=4).text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert key_file.read_text() not in err
