"""Subcommands of the MQTT side: `agent` (serve a model on a device; with --http also the OpenAI-compatible HTTP
API) and `ask` (a prompt from any machine)."""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from agent.errors import AgentInputError
from cli.model_commands import _positive_int


def _add_connection(p: argparse.ArgumentParser, device_flag: str):
    p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (env CPM_EDGE_BROKER; "
                                    "default mqtt://127.0.0.1:1883)")
    p.add_argument(device_flag, dest="device_id", help="the device's id: its topics are <prefix>/<id>/... "
                                                       "(env CPM_EDGE_DEVICE_ID)")
    p.add_argument("--username", help="MQTT user name (env CPM_EDGE_MQTT_USERNAME)")
    p.add_argument("--password-file", help="file holding the MQTT password (or env CPM_EDGE_MQTT_PASSWORD)")
    p.add_argument("--ca-file", help="mqtts: CA certificate that signed the broker's (default: system CAs)")
    p.add_argument("--cert-file", help="mqtts: client certificate (when the broker requires one)")
    p.add_argument("--key-file", help="mqtts: client private key")
    p.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5", help="protocol version (default 5)")
    p.add_argument("--prefix", default="cpm/v1", help="topic prefix (default cpm/v1)")


def _password(args):
    if not args.password_file:
        return None
    try:
        return Path(args.password_file).read_text().rstrip("\r\n")
    except OSError as e:
        raise AgentInputError(f"--password-file {args.password_file}: cannot read ({e.strerror})") from None


# --- agent ------------------------------------------------------------------------------------------
def agent_arguments(p: argparse.ArgumentParser):
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--bundle", help="model bundle: an ONNX export folder or a TensorRT engine bundle")
    model.add_argument("--torch-model", metavar="MODEL_DIR",
                       help="host testing only: serve a Hugging Face folder with the torch model")
    _add_connection(p, "--device-id")
    p.add_argument("--fleet-group", help="with --pool: also serve <prefix>/pool/<pool>/request through "
                                         "$share/<group>/ (several agents, one queue)")
    p.add_argument("--pool", help="the pool name of the fleet mode")
    p.add_argument("--queue-size", type=_positive_int, default=64, help="requests that may wait for a row "
                                                                        "(more are answered busy; 64)")
    p.add_argument("--max-tokens", type=_positive_int, default=1024, help="the most a request may ask for (1024)")
    p.add_argument("--max-prompt-tokens", type=_positive_int, help="longest prompt (default: what the model holds)")
    p.add_argument("--max-payload-bytes", type=_positive_int, default=64 * 1024, help="largest request (64 KiB)")
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds a request may wait before it is "
                                                                  "answered `expired` (120; 0 = no limit)")
    p.add_argument("--telemetry", type=float, default=10.0, help="seconds between telemetry messages (0 = off)")
    p.add_argument("--session-expiry", type=int, default=0,
                   help="> 0: persistent MQTT session; requests sent while the agent is away wait this long")
    p.add_argument("--max-batch", type=_positive_int, default=4,
                   help="cache rows: requests decoded together (4; an engine bundle fixes its own)")
    p.add_argument("--max-seq", type=_positive_int, help="positions per row (default: the bundle's; 1024 for "
                                                         "--torch-model)")
    p.add_argument("--prefill-chunk", type=_positive_int,
                   help="prompt tokens prefilled per scheduler step, between decode steps of the other requests "
                        "(env CPM_EDGE_PREFILL_CHUNK; default: the bundle's device profile, else 512)")
    p.add_argument("--state-dir", help="writable folder for what the device makes itself (engines built here); "
                                       "the systemd unit passes its StateDirectory, /var/lib/cpm-edge")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible HTTP API there, e.g. 127.0.0.1:8000 (env CPM_EDGE_HTTP; "
                        "0.0.0.0:8000 for other machines: then set --api-key-file)")
    p.add_argument("--api-key-file", help="with --http: file holding the API key HTTP clients must send as "
                                          "`Authorization: Bearer KEY` (env CPM_EDGE_API_KEY_FILE)")


def agent(args) -> int:
    import logging
    import os
    import signal

    from agent.config import AgentConfig
    from agent.service import Agent

    config = AgentConfig.from_sources(
        broker=args.broker, device_id=args.device_id, username=args.username, password=_password(args),
        ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file, mqtt_version=args.mqtt_version,
        prefix=args.prefix, fleet_group=args.fleet_group, pool=args.pool, queue_size=args.queue_size,
        max_tokens=args.max_tokens, default_max_tokens=min(256, args.max_tokens),
        max_prompt_tokens=args.max_prompt_tokens or 0, max_payload_bytes=args.max_payload_bytes,
        max_wait_s=args.max_wait, telemetry_s=args.telemetry, session_expiry_s=args.session_expiry,
        prefill_chunk=args.prefill_chunk, http=args.http, api_key_file=args.api_key_file).validate()
    if args.bundle and not Path(args.bundle).is_dir():
        raise AgentInputError(f"--bundle {args.bundle}: folder not found")
    if args.state_dir and not (Path(args.state_dir).is_dir() and os.access(args.state_dir, os.W_OK | os.X_OK)):
        raise AgentInputError(f"--state-dir {args.state_dir}: not a writable folder (the unit's StateDirectory= "
                              f"makes it; by hand: mkdir -p it, owned by the agent's user)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    runner = Agent(config)
    try:
        refused = _refused_at_start(runner)
        if refused:
            raise AgentInputError(refused)
        backend, tokenizer, info = _load(args)
        runner.serve(backend, tokenizer, info)
        logging.getLogger("cpm-edge.agent").info("serving %s on %s as %s", info.get("model", "model"),
                                                 config.address, config.device_id)
        stop.wait()
    finally:
        runner.stop()
    return 0


def _refused_at_start(runner, wait_s: float = 5.0):
    """A broker that answers and refuses (credentials, ACL) is a configuration error; an absent one is not."""
    import time

    deadline = time.monotonic() + wait_s
    while not runner.transport.connected.wait(0.1) and time.monotonic() < deadline:
        if runner.transport.last_error:
            return runner.transport.last_error
    return None


def _load(args):
    if args.bundle:
        from agent.backends import open_bundle  # the ONNX Runtime / TensorRT backends (torch-free)
        return open_bundle(args.bundle, max_batch=args.max_batch, max_seq=args.max_seq,
                           state_dir=getattr(args, "state_dir", None))
    from agent.tokenizer import Tokenizer
    from cli.model_commands import load_torch_backend

    args.dtype, args.ternary, args.model_dir = "fp32", "off", args.torch_model
    backend = load_torch_backend(args, max_batch=args.max_batch, max_seq=args.max_seq or 1024)
    return backend, Tokenizer(args.torch_model), {"model": Path(args.torch_model).name, "backend": "torch"}


# --- ask --------------------------------------------------------------------------------------------
def ask_arguments(p: argparse.ArgumentParser):
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    _add_connection(p, "--device")
    p.add_argument("--pool", help="send to a fleet's pool instead of one device")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the ChatML template")
    p.add_argument("--system", help="system message (implies --chat)")
    p.add_argument("--max-tokens", type=_positive_int, help="tokens to generate at most (agent default 256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--stop", action="append", help="stop at this text (repeatable)")
    p.add_argument("--json-schema", metavar="SCHEMA",
                   help="answer JSON valid against this JSON Schema (the schema's text, or @FILE)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without any reply before giving up (30)")


def ask(args) -> int:
    import os

    from agent.client import AgentClient, AgentError

    if not args.device_id and not os.environ.get("CPM_EDGE_DEVICE_ID"):
        raise AgentInputError("--device: which device to ask (or set CPM_EDGE_DEVICE_ID)")
    broker = args.broker or os.environ.get("CPM_EDGE_BROKER") or "mqtt://127.0.0.1:1883"
    username = args.username or os.environ.get("CPM_EDGE_MQTT_USERNAME")
    password = _password(args) or os.environ.get("CPM_EDGE_MQTT_PASSWORD")
    client = AgentClient(broker, args.device_id or os.environ["CPM_EDGE_DEVICE_ID"], username=username,
                         password=password, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                         mqtt_version=args.mqtt_version, prefix=args.prefix, pool=args.pool)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    if args.json_schema:
        params["response_format"] = {"type": "json_schema", "json_schema": {"schema": _json_schema(args.json_schema)}}
    if args.system or args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        prompt = None
    else:
        messages, prompt = None, args.prompt
    try:
        client.connect(timeout=min(args.timeout, 10.0))
        try:
            answer = client.ask(prompt, messages=messages, timeout=args.timeout,
                                on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), **params)
        finally:
            client.close()
    except AgentError as e:
        sys.stdout.write("\n")
        print(f"cpm-edge ask: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    u, t = answer.usage, answer.timings
    print(f"[{u.get('prompt_tokens')} prompt tokens, {u.get('completion_tokens')} generated, finish: "
          f"{answer.finish_reason}, first token {t.get('ttft_ms', 0):.0f} ms, "
          f"{t.get('tokens_per_s', 0):.1f} tok/s]", file=sys.stderr)
    if args.json_schema:
        print(f"[parsed: {json.dumps(answer.parsed)}]" if answer.parsed is not None else
              "[no JSON value: the answer was cut by --max-tokens]", file=sys.stderr)
    return 0


def _json_schema(text: str):
    """--json-schema's value: the schema itself, or @FILE holding it."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as e:
            raise AgentInputError(f"--json-schema {text}: cannot read ({e.strerror})") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise AgentInputError(f"--json-schema: not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(schema, dict):
        raise AgentInputError("--json-schema: a JSON Schema is an object")
    return schema


COMMANDS = [
    ("agent", agent_arguments, agent, "serve a model bundle to other devices over MQTT (and HTTP with --http)"),
    ("ask", ask_arguments, ask, "send a prompt to a device agent over MQTT and stream the answer"),
]
