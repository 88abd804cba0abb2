"""The OpenAI-compatible HTTP API of the agent, beside MQTT: same process, same scheduler, same batch.

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events ending `data: [DONE]`)
    GET  /v1/models             GET  /health           (200 only while the model is loaded and the scheduler runs)

An HTTP request is translated into the request object an MQTT client sends (`agent_request`) and handed to
AgentServer.submit, so parse_request validates both alike and both share the inbox, the limits and the batch.
Its replies (the protocol's chunk / done / error payloads) come back through a `_Reply`: the scheduler thread
appends to a deque and wakes the event loop, it never waits for a client; a client that stops reading while
MAX_UNREAD replies pile up is cancelled, and one that disconnects is cancelled at once (aiohttp's
handler_cancellation), so no batch row outlives its client. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}} with the status of ERRORS (one table for every protocol code).

Why aiohttp: an asyncio server with streamed responses and an HTTP parser of its own (llhttp), kept up to date,
with wheels for aarch64 Python 3.10/3.12 (the Jetsons). The stdlib's http.server is a thread per connection that
cannot tell when a client that waits for its first token has gone, and its docs advise against production use.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from aiohttp import web

from agent import protocol as P
from agent.config import HttpAddress
from agent.errors import AgentInputError

log = logging.getLogger("cpm-edge.agent")

MAX_UNREAD = 64          # replies waiting for a client that does not read; past this it is cancelled
WRITE_TIMEOUT_S = 30.0   # a stream write that waits this long for the client ends the connection
INVALID, RATE, SERVER = "invalid_request_error", "rate_limit_error", "server_error"
# protocol error code -> (HTTP status, OpenAI error type): every refusal of the scheduler goes through this
ERRORS = {P.BAD_JSON: (400, INVALID), P.BAD_REQUEST: (400, INVALID), P.PROMPT_TOO_LONG: (400, INVALID),
          P.TOO_MANY_TOKENS: (400, INVALID), P.DUPLICATE_ID: (400, INVALID), P.PAYLOAD_TOO_LARGE: (413, INVALID),
          P.UNKNOWN_REQUEST: (404, INVALID), P.BUSY: (429, RATE), P.EXPIRED: (503, SERVER),
          P.SHUTTING_DOWN: (503, SERVER), P.INTERNAL: (500, SERVER)}
RETRY_AFTER_S = "1"      # sent with 429 and 503: the openai client honours it
FINAL = ("done", "error")  # the reply types that end a request (exactly one comes)

# OpenAI body keys -> the agent request's; the others of ACCEPTED are checked and translated by hand.
PASSED = {"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream"}
CHAT_PASSED = PASSED | {"chat_template_kwargs", "tools", "response_format"}
# Accepted only with the value that changes nothing (the agent has no penalties, logprobs or several choices).
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "echo": False, "best_of": 1}
ACCEPTED = {"model", "stream_options", "user"} | set(NEUTRAL)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or (SERVER if status >= 500 else INVALID)

    @classmethod
    def from_reply(cls, reply: dict) -> "ApiError":
        status, kind = ERRORS.get(reply.get("code"), (500, SERVER))
        return cls(status, reply.get("message", ""), reply.get("code", P.INTERNAL), type=kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": RETRY_AFTER_S} if self.status in (429, 503) else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def agent_request(body, chat: bool) -> dict:
    """The agent request object (docs/protocol.md) for an OpenAI request body; ApiError (400) on what this agent
    does not do. Keys whose value is null count as absent, as OpenAI treats them."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", P.BAD_JSON)
    body = {k: v for k, v in body.items() if v is not None}
    passed = CHAT_PASSED if chat else PASSED
    what = {"messages"} if chat else {"prompt"}
    unknown = sorted(set(body) - passed - ACCEPTED - what - ({"max_completion_tokens"} if chat else set()))
    if unknown:
        raise ApiError(400, f"{unknown[0]}: not supported by this agent", P.BAD_REQUEST, unknown[0])
    if not isinstance(body.get("stream_options", {}), dict):
        raise ApiError(400, "stream_options: an object such as {\"include_usage\": true}", P.BAD_REQUEST,
                       "stream_options")
    for key, neutral in NEUTRAL.items():
        if key in body and (body[key] != neutral or isinstance(body[key], bool) != isinstance(neutral, bool)):
            raise ApiError(400, f"{key}: this agent supports only {json.dumps(neutral)}", P.BAD_REQUEST, key)
    data = {k: body[k] for k in passed if k in body}
    data["stream"] = body.get("stream", False)
    if chat and "max_completion_tokens" in body:  # OpenAI's newer name wins over the deprecated max_tokens
        data["max_tokens"] = body["max_completion_tokens"]
    if data.get("response_format") == {"type": "text"}:  # OpenAI's default: no constraint
        del data["response_format"]
    if chat:
        data["messages"] = _messages(body.get("messages"))
    else:
        data["prompt"] = _prompt(body.get("prompt"))
    return data


def _messages(messages) -> list:
    """OpenAI messages with their content as one string (text parts joined); `developer` is the system role."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: a non-empty list of {role, content}", P.BAD_REQUEST, "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}]: an object {{role, content}}", P.BAD_REQUEST, "messages")
        m = dict(m, role="system") if m.get("role") == "developer" else dict(m)
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", P.BAD_REQUEST,
                               "messages")
            m["content"] = "\n".join(p["text"] for p in content)
        out.append(m)
    return out


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt: one string (token ids and several prompts are not supported)",
                       P.BAD_REQUEST, "prompt")
    return prompt


class _Reply:
    """One request's replies, from the scheduler thread to its handler on the event loop. Calling it never
    blocks: the payload goes into a deque and the loop is woken. Past MAX_UNREAD unread replies the request
    is cancelled once (its final message still comes)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.payloads: deque = deque()
        self.ready = asyncio.Event()
        self.cancel: Callable[[], bool] = lambda: False
        self.overflowed = False

    def __call__(self, payload: bytes):
        self.payloads.append(payload)
        if len(self.payloads) > MAX_UNREAD and not self.overflowed:
            self.overflowed = True
            log.info("HTTP client reads too slowly: %d replies unread, request cancelled", len(self.payloads))
            self.cancel()
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the loop is closed: the HTTP server stopped, nobody waits for this reply
            pass

    async def next(self) -> dict:
        while not self.payloads:
            self.ready.clear()
            await self.ready.wait()
        return json.loads(self.payloads.popleft())


def model_name(info: dict) -> str:
    """What /v1/models lists: the bundle's model name, else the checkpoint folder an export was made from."""
    return str(info.get("model") or Path(str(info.get("source") or "model")).name)


class HttpApi:
    """The HTTP server, on an event loop in its own thread. start() binds (AgentInputError when it cannot);
    attach() hands it the AgentServer once the model is loaded (until then /health says 503 `loading`)."""

    def __init__(self, address: HttpAddress, api_key: Optional[str] = None, max_body_bytes: int = 64 * 1024):
        self.address, self.max_body_bytes = address, max_body_bytes
        self._key = None if api_key is None else api_key.encode()
        self.server = None
        self.model = "model"
        self.port: Optional[int] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._error: Optional[str] = None

    def attach(self, server, info: dict):
        self.model = model_name(info)
        self.server = server

    # --- lifecycle (any thread) ----------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "HttpApi":
        self._thread = threading.Thread(target=self._serve, name="cpm-http", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise AgentInputError(f"--http {self.address}: the HTTP server did not start within {timeout:.0f} s")
        if self._error:
            raise AgentInputError(self._error)
        log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", self.address.host, self.port)
        return self

    def stop(self, timeout: float = 10.0):
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)

    def _serve(self):
        self.loop = loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._open())
        except OSError as e:
            self._error = f"--http {self.address}: cannot listen there ({e.strerror or e})"
        except Exception as e:  # reported by start() on the caller's thread, not lost in this one
            self._error = f"--http {self.address}: the HTTP server did not start ({type(e).__name__}: {e})"
        self._started.set()
        if self._error is None:
            loop.run_forever()  # until stop()
        if self._runner is not None:
            loop.run_until_complete(self._runner.cleanup())
        loop.close()

    async def _open(self):
        app = web.Application(middlewares=[self._errors_and_key], client_max_size=self.max_body_bytes)
        app.add_routes([web.post("/v1/chat/completions", self.chat_completions),
                        web.post("/v1/completions", self.completions),
                        web.get("/v1/models", self.models), web.get("/v1/models/{model}", self.models),
                        web.get("/health", self.health)])
        # handler_cancellation: a client that disconnects cancels its handler, which cancels its request
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.address.host, self.address.port).start()
        self.port = self._runner.addresses[0][1]

    # --- handlers (event loop) -----------------------------------------------------------------------
    @web.middleware
    async def _errors_and_key(self, request: web.Request, handler):
        try:
            if self._key is not None and request.path.startswith("/v1/"):
                self._check_key(request)
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method, body too large
            if e.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: P.PAYLOAD_TOO_LARGE}.get(e.status, "http_error")
            message = {404: f"{request.method} {request.path}: no such route (see GET /v1/models)",
                       413: f"the body is larger than {self.max_body_bytes} bytes"}.get(e.status, e.reason)
            return ApiError(e.status, message, code).response()
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return ApiError(500, "internal error", P.INTERNAL).response()

    def _check_key(self, request: web.Request):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                           "invalid_api_key")

    async def health(self, request: web.Request) -> web.Response:
        server = self.server
        if server is None:
            return web.json_response({"status": "loading"}, status=503)
        if not server.running:
            return web.json_response({"status": "stopping"}, status=503)
        return web.json_response({"status": "ok", "model": self.model, "outstanding": server.outstanding})

    async def models(self, request: web.Request) -> web.Response:
        entry = {"id": self.model, "object": "model", "created": 0, "owned_by": "cpm-edge"}
        wanted = request.match_info.get("model")
        if wanted is None:
            return web.json_response({"object": "list", "data": [entry]})
        if wanted != self.model:
            raise ApiError(404, f"model {wanted!r}: this agent serves {self.model!r}", "model_not_found", "model")
        return web.json_response(entry)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        server = self.server
        if server is None:
            raise ApiError(503, "the model is still loading", "loading")
        body = await self._json(request)
        data = agent_request(body, chat)
        if body.get("model") not in (None, self.model):
            raise ApiError(404, f"model {body['model']!r}: this agent serves {self.model!r}", "model_not_found",
                           "model")
        out = _OpenAIFormat(chat, self.model, bool((body.get("stream_options") or {}).get("include_usage")))
        reply = _Reply(asyncio.get_running_loop())
        reply.cancel = server.submit(data, reply)
        ended = False  # the final reply (done / error) arrived: nothing left to cancel
        try:
            first = await reply.next()
            ended = first["type"] in FINAL
            if first["type"] == "error":  # refused before any text: a plain HTTP error
                raise ApiError.from_reply(first)
            if not data["stream"]:
                return web.json_response(out.whole(first))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                await self._stream(request, response, reply, first, out)
                ended = True
                await response.write_eof()
            except (ConnectionError, asyncio.TimeoutError):
                log.info("HTTP client gone mid-stream; its request is cancelled")
            return response
        finally:
            if not ended:
                reply.cancel()

    async def _json(self, request: web.Request):
        raw = await request.read()  # past client_max_size: HTTPRequestEntityTooLarge, a 413 by the middleware
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not JSON ({type(e).__name__}: {str(e)[:80]})", P.BAD_JSON) from None

    async def _stream(self, request, response, reply: _Reply, msg: dict, out: "_OpenAIFormat"):
        async def send(obj):
            line = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            try:
                await asyncio.wait_for(response.write(line), WRITE_TIMEOUT_S)
            except asyncio.TimeoutError:
                if request.transport is not None:
                    request.transport.close()
                raise

        if out.chat:
            await send(out.chunk({"role": "assistant", "content": ""}))
        while True:
            if msg["type"] == "chunk":
                await send(out.chunk(msg["text"]))
            elif msg["type"] in FINAL:
                for obj in (out.last(msg) if msg["type"] == "done" else [ApiError.from_reply(msg).body()]):
                    await send(obj)
                await send(b"[DONE]")
                return
            msg = await reply.next()


class _OpenAIFormat:
    """The agent's reply payloads as OpenAI's chat.completion / text_completion objects and their chunks."""

    def __init__(self, chat: bool, model: str, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    @staticmethod
    def _usage(done: dict) -> dict:
        u = done["usage"]
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}

    def whole(self, done: dict) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": done["text"]}
            if done.get("reasoning") is not None:
                message["reasoning_content"] = done["reasoning"]
            choice = {"index": 0, "message": message, "finish_reason": done["finish_reason"], "logprobs": None}
            return self._object("chat.completion", [choice], usage=self._usage(done))
        choice = {"index": 0, "text": done["text"], "finish_reason": done["finish_reason"], "logprobs": None}
        return self._object("text_completion", [choice], usage=self._usage(done))

    def chunk(self, delta, finish_reason: Optional[str] = None) -> dict:
        """delta: the new text (a dict for chat: the message delta)."""
        if self.chat:
            delta = {"content": delta} if isinstance(delta, str) else delta
            return self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                           "finish_reason": finish_reason}])
        return self._object("text_completion", [{"index": 0, "text": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}])

    def last(self, done: dict) -> list:
        """The closing chunk(s): the finish reason, then the usage when stream_options.include_usage asked."""
        objs = [self.chunk({} if self.chat else "", done["finish_reason"])]
        if self.include_usage:
            objs.append(self._object(objs[0]["object"], [], usage=self._usage(done)))
        return objs
