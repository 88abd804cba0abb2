"""Structured output (response_format / grammar) on the tiny random-weight model in ONNX Runtime, served over a
real Mosquitto: the model's weights are noise, so every well-formed answer is the grammar's doing. Answers are
checked by independent judges: the `jsonschema` package for schemas, Python's `re.fullmatch` for regexes."""
from __future__ import annotations

import json
import queue
import random
import re

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.constraints import Grammars, parse_constraint
from agent.errors import AgentInputError

MAX_TOKENS = 400       # answers are bounded by the schemas below (WORST_TOKENS); the model holds 512 positions
WORST_TOKENS = 300     # a schema's longest possible answer, counting one token per byte (strings as \u escapes)
PROMPT = "The robot reports its state as JSON:"


# --- random schemas ---------------------------------------------------------------------------------
def random_schema(rng: random.Random, depth: int = 0, finite: bool = False) -> dict:
    """A JSON Schema of nested objects, enums, arrays (min/maxItems), bounded integers and numbers, strings
    with maxLength, required keys. finite: no unbounded number fractions (every answer ends by construction)."""
    kinds = ["string", "integer", "enum", "boolean", "array"] + ([] if finite else ["number"])
    if depth < 2:
        kinds += ["object", "object"]
    kind = rng.choice(kinds) if depth else "object"
    if kind == "object":
        names = rng.sample(["id", "name", "x", "speed", "ok", "tags", "pose", "mode", "battery", "arm"],
                           rng.randint(1, 3 if depth else 4))
        props = {n: random_schema(rng, depth + 1, finite) for n in names}
        return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(0, len(names))),
                "additionalProperties": False}
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 4)}
    if kind == "integer":
        low = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 5000)}
    if kind == "number":
        low = round(rng.uniform(-50, 50), 2)
        return {"type": "number", "minimum": low, "maximum": round(low + rng.uniform(0.5, 100), 2)}
    if kind == "enum":
        return {"enum": rng.sample(["left", "right", "up", "stop", 3, 7.5, True, None], rng.randint(1, 4))}
    if kind == "boolean":
        return {"type": "boolean"}
    low = rng.randint(0, 2)
    return {"type": "array", "items": random_schema(rng, depth + 1, finite), "minItems": low,
            "maxItems": low + rng.randint(0, 2)}


def worst_tokens(s: dict) -> float:
    """The longest answer a schema allows, in bytes (a token is at least one byte); numbers count 40."""
    if "enum" in s:
        return max(len(json.dumps(v)) for v in s["enum"])
    t = s["type"]
    if t == "object":
        return 2 + sum(len(k) + 4 + worst_tokens(v) for k, v in s["properties"].items())
    if t == "array":
        return 2 + s["maxItems"] * (worst_tokens(s["items"]) + 1)
    if t == "string":
        return 2 + 6 * s["maxLength"]
    if t == "integer":
        return max(len(str(s["minimum"])), len(str(s["maximum"])))
    return 40 if t == "number" else 5


def schemas(rng: random.Random, n: int, finite: bool = False) -> list[dict]:
    out = []
    while len(out) < n:
        s = random_schema(rng, finite=finite)
        if worst_tokens(s) <= WORST_TOKENS:
            out.append(s)
    return out


# --- serving ----------------------------------------------------------------------------------------
class RowWatcher:
    """The ONNX Runtime backend, noting before each decode how many of the batch's rows are constrained and
    how many free (read off the agent's own generator), to show both kinds share one decode step."""

    def __init__(self, backend):
        self.backend, self.agent, self.steps = backend, None, []
        self.max_batch, self.max_seq = backend.max_batch, backend.max_seq

    def prefill(self, row, ids, start=0):
        return self.backend.prefill(row, ids, start)

    def decode(self, tokens, positions):
        rows = [r for r in self.agent.server.generator.rows[:len(tokens)] if r is not None]
        self.steps.append((sum(r.constraint is not None for r in rows), sum(r.constraint is None for r in rows)))
        return self.backend.decode(tokens, positions)


@pytest.fixture
def served(broker, run_agent, ort_export):
    """(agent, watcher, tokenizer, export folder, send, replies) on the tiny dense model with 8 cache rows."""
    from agent.onnxruntime_backend import OnnxRuntimeBackend
    from agent.tokenizer import Tokenizer

    export_dir = ort_export("dense")
    tok = Tokenizer(export_dir)
    watcher = RowWatcher(OnnxRuntimeBackend(export_dir, max_batch=8))
    agent = run_agent(broker.url, backend=watcher, tokenizer=tok, queue_size=256, chunk_tokens=64)
    watcher.agent = agent
    finals: queue.Queue = queue.Queue()

    def on_message(client, userdata, m):
        reply = json.loads(m.payload)
        if reply["type"] in ("done", "error"):
            finals.put(reply)

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = on_message
    subscribed = queue.Queue()
    c.on_subscribe = lambda *a: subscribed.put(1)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.subscribe("so/replies", 1)
    subscribed.get(timeout=5)

    def send(rid, **fields):
        body = {"id": rid, "reply_to": "so/replies", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": False,
                **fields}
        c.publish("cpm/v1/dev1/request", json.dumps(body), qos=1)

    def replies(n, timeout=90) -> dict:
        out = {}
        while len(out) < n:
            p = finals.get(timeout=timeout)
            out[p["id"]] = p
        return out

    yield agent, watcher, tok, export_dir, send, replies
    c.loop_stop()
    c.disconnect()


def json_schema_format(schema: dict, **extra) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "state", "schema": schema, **extra}}


# --- tests ------------------------------------------------------------------------------------------
def test_random_schemas_over_mqtt_with_free_rows_in_the_same_batch(served, seed):
    """100 random schemas (a fifth greedy, the rest sampled) and 20 free requests sent together: every
    constrained answer ends with "stop" and its text is JSON that validates against its schema, `parsed` is that
    value; the free greedy answers are exactly what the model gives unconstrained; some decode steps carried
    constrained and free rows together."""
    from agent.generation import SamplingParams, generate

    agent, watcher, tok, export_dir, send, replies = served
    rng = random.Random(seed)
    wanted = {}
    for i, schema in enumerate(schemas(rng, 20, finite=True) + schemas(rng, 80)):
        wanted[f"s{i}"] = schema
        send(f"s{i}", response_format=json_schema_format(schema, strict=True),
             temperature=0 if i < 20 else 1.0, seed=rng.randrange(2 ** 32))
        if i % 5 == 0:
            send(f"f{i}", max_tokens=24, temperature=0)
    got = replies(120)
    for rid, schema in wanted.items():
        msg = got[rid]
        assert msg["type"] == "done" and msg["finish_reason"] == "stop", (schema, msg)
        value = json.loads(msg["text"])
        jsonschema.validate(value, schema)
        assert msg["parsed"] == value, msg
    from agent.onnxruntime_backend import OnnxRuntimeBackend
    (alone,) = generate(OnnxRuntimeBackend(export_dir, max_batch=1), tok, [tok.encode(PROMPT)],
                        [SamplingParams(max_tokens=24)])
    for rid in (r for r in got if r.startswith("f")):
        assert got[rid]["text"] == alone.text and "parsed" not in got[rid], got[rid]
    assert any(c and f for c, f in watcher.steps), watcher.steps


def test_regex_and_lark_grammars_match(served, seed):
    """Regex answers fullmatch their regex; a Lark grammar's answers fullmatch the same language as a regex."""
    agent, watcher, tok, export_dir, send, replies = served
    rng = random.Random(seed)
    # [0-9], not \d: llguidance's \d is Unicode's (Rust regex), which knows digits newer than Python's `re`
    regexes = [r"[A-Z]{2}-[0-9]{3,5}", r"(yes|no|maybe)", r"-?[0-9]{1,4}\.[0-9]{2}",
               r"[a-z]{1,8}@[a-z]{1,6}\.(com|org)", r"(left|right) [0-9]{1,3} (cm|mm)", r"#[0-9a-f]{6}"]
    lark = 'start: DIR " " NUM " " UNIT\nDIR: "left" | "right"\nNUM: /[0-9]{1,3}/\nUNIT: "cm" | "mm"\n'
    sent = {}
    for i in range(24):
        sent[f"r{i}"] = regexes[i % len(regexes)]
        send(f"r{i}", grammar={"type": "regex", "regex": sent[f"r{i}"]}, temperature=rng.choice([0, 1.0]),
             seed=rng.randrange(2 ** 32), max_tokens=120)
    for i in range(6):
        sent[f"l{i}"] = r"(left|right) [0-9]{1,3} (cm|mm)"
        send(f"l{i}", grammar={"type": "lark", "lark": lark}, temperature=1.0, seed=rng.randrange(2 ** 32))
    got = replies(len(sent))
    for rid, regex in sent.items():
        msg = got[rid]
        assert msg["type"] == "done" and msg["finish_reason"] == "stop", msg
        assert re.fullmatch(regex, msg["text"]), (regex, msg["text"])
        assert "parsed" not in msg


def test_cut_json_says_length_and_has_no_parsed(served):
    """json_object with a tiny max_tokens: the object is not finished, so finish_reason is "length" and no
    `parsed`; the text so far is still a prefix of some JSON object (it starts with '{')."""
    agent, watcher, tok, export_dir, send, replies = served
    send("cut", response_format={"type": "json_object"}, grammar=None, max_tokens=6, temperature=1.0, seed=3)
    (msg,) = replies(1).values()  # grammar: null is as good as not given (OpenAI clients send nulls)
    assert msg["finish_reason"] == "length" and "parsed" not in msg, msg
    assert msg["text"].startswith("{") and msg["usage"]["completion_tokens"] == 6, msg


def test_rejected_schemas_and_grammars_are_bad_requests_naming_the_problem(served):
    agent, watcher, tok, export_dir, send, replies = served
    cases = {
        "minmax": (dict(response_format=json_schema_format({"type": "string", "minLength": 5, "maxLength": 2})),
                   "minLength"),
        "format": (dict(response_format=json_schema_format({"type": "string", "format": "no-such-format"})),
                   "no-such-format"),
        "regex": (dict(grammar={"type": "regex", "regex": "[a-z"}), "unclosed character class"),
        "lark": (dict(grammar={"type": "lark", "lark": "start: undefined_rule\n"}), "undefined_rule"),
        "shape": (dict(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}), "schema"),
        "both": (dict(response_format={"type": "json_object"}, grammar={"type": "regex", "regex": "a"}),
                 "at most one"),
    }
    for rid, (fields, _) in cases.items():
        send(rid, **fields)
    send("after", response_format=json_schema_format({"type": "boolean"}))  # the agent still serves
    got = replies(len(cases) + 1)
    for rid, (_, words) in cases.items():
        msg = got[rid]
        assert msg["type"] == "error" and msg["code"] == "bad_request", msg
        assert words in msg["message"] and "\n" not in msg["message"], msg
        assert msg["message"].startswith(("response_format", "grammar", "give at most one")), msg
    assert got["after"]["parsed"] in (True, False), got["after"]


@pytest.mark.parametrize("body, problem", [
    ({"response_format": "json"}, "response_format: expected an object"),
    ({"response_format": {"type": "xml"}}, "response_format: expected an object"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema: unknown key"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema: expected an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema: must be a JSON Schema object, got nothing"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 2000]}}}},
     "bytes, the limit is 1000"),
    ({"grammar": {"type": "regex"}}, "grammar.regex: must be a non-empty string"),
    ({"grammar": {"type": "lark", "lark": "start: \"a\"", "regex": "a"}}, "grammar.regex: unknown key"),
    ({"grammar": {"type": "ebnf", "ebnf": "x"}}, "grammar: expected"),
])
def test_request_shapes_are_checked_before_compiling(body, problem):
    with pytest.raises(AgentInputError, match=re.escape(problem)):
        parse_constraint(body, max_bytes=1000)


def test_text_format_and_no_keys_mean_no_constraint():
    assert parse_constraint({"response_format": {"type": "text"}}, 1000) is None
    assert parse_constraint({"prompt": "hi"}, 1000) is None


def test_eos_is_allowed_only_where_the_grammar_accepts(tiny_tokenizer, seed):
    """For a regex of 2-4 digits: before two digits eos is masked, from two digits on it is allowed, after four
    only eos remains (and the matcher reports completion); the mask follows re.fullmatch of each prefix."""
    tok = tiny_tokenizer
    grammars = Grammars(tok)
    c = grammars.compile(parse_constraint({"grammar": {"type": "regex", "regex": r"[0-9]{2,4}"}}, 1000))
    vocab = tok._tok.get_vocab()
    digit_ids = {d: vocab.get(d, vocab[f"<0x{ord(d):02X}>"]) for d in "0123456789"}  # a piece, else its byte
    rng = np.random.default_rng(seed)
    eos = tok.eos_ids[0]
    for n in range(4):
        logits = rng.standard_normal(tok.vocab_size).astype(np.float32)
        masked = c.apply(logits)
        assert np.isfinite(masked[eos]) == (n >= 2), n
        assert all(np.isfinite(masked[i]) for i in digit_ids.values())
        allowed = np.flatnonzero(np.isfinite(masked))
        for t in allowed:  # every allowed token keeps the text a prefix of the language
            if t not in tok.eos_ids:
                piece = tok.decode([int(t)])
                assert re.fullmatch(r"[0-9]{0,4}", "0" * n + piece), (n, piece)
        complete = c.advance(digit_ids[str(rng.integers(10))])
        assert complete == (n == 3)
    grammars.fill_masks([c])
    assert np.flatnonzero(np.isfinite(c.apply(np.zeros(tok.vocab_size, np.float32)))).tolist() == tok.eos_ids


def test_the_mosquitto_rr_examples_of_docs_protocol(served, broker):
    """The two structured-output examples of docs/protocol.md, run as written (host and device swapped in)."""
    import shlex
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("mosquitto_rr") is None:
        pytest.skip("mosquitto_rr not installed (apt-get install mosquitto-clients)")
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## Structured output"):doc.index("## Broker loss")]
    commands = [c.replace("\\\n", " ") for c in re.findall(r"^mosquitto_rr .*?'$", section, re.M | re.S)]
    assert len(commands) == 2, commands
    answers = []
    for command in commands:
        argv = shlex.split(command.replace("-h broker", f"-h 127.0.0.1 -p {broker.port}").replace("orin-01", "dev1"))
        out = subprocess.run(argv + ["-W", "20"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        answers.append(json.loads(out.stdout))
    schema = json.loads(shlex.split(commands[0])[-1])["response_format"]["json_schema"]["schema"]
    assert answers[0]["finish_reason"] == "stop", answers[0]
    jsonschema.validate(answers[0]["parsed"], schema)
    assert answers[0]["parsed"] == json.loads(answers[0]["text"])
    assert re.fullmatch(r"(left|right) [0-9]{1,3} (cm|mm)", answers[1]["text"]), answers[1]


def test_one_parallel_call_gives_each_rows_own_mask(tiny_tokenizer, seed):
    """Grammars.fill_masks in one LLExecutor call (what >2-core machines use) equals each matcher's own mask,
    for rows of different grammars at different points of their answers."""
    tok = tiny_tokenizer
    grammars = Grammars(tok)
    rng = np.random.default_rng(seed)
    bodies = [{"response_format": json_schema_format(s)} for s in schemas(random.Random(seed), 4)]
    bodies += [{"grammar": {"type": "regex", "regex": r"[a-z]{3,9}-\d{2}"}},
               {"response_format": {"type": "json_object"}}]
    rows = [grammars.compile(parse_constraint(b, 10_000)) for b in bodies]
    for _ in range(12):
        grammars.fill_masks(rows, parallel=True)
        together = [r.mask.copy() for r in rows]
        grammars.fill_masks(rows, parallel=False)
        for r, mask in zip(rows, together):  # the same tokens allowed (one call may pad the mask differently)
            assert np.array_equal(allowed_tokens(mask, tok.vocab_size), allowed_tokens(r.mask, tok.vocab_size))
        for r in list(rows):
            token = int(np.argmax(r.apply(rng.standard_normal(tok.vocab_size).astype(np.float32))))
            if token in tok.eos_ids or r.advance(token):
                rows.remove(r)
        if not rows:
            break


def allowed_tokens(mask: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab])
