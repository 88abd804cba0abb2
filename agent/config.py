"""The agent's settings: one dataclass, validated at start, with environment overrides and secrets redacted.

Precedence: a value given on the command line, else the environment (CPM_EDGE_BROKER, CPM_EDGE_DEVICE_ID,
CPM_EDGE_MQTT_USERNAME, CPM_EDGE_MQTT_PASSWORD, CPM_EDGE_PREFILL_CHUNK, CPM_EDGE_HTTP, CPM_EDGE_API_KEY_FILE),
else the default. The password never appears in logs, repr() or `redacted()`; the HTTP API key is only ever
read from its file (read_api_key), never held in the settings.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from agent.errors import AgentInputError

ENV = {"broker": "CPM_EDGE_BROKER", "device_id": "CPM_EDGE_DEVICE_ID",
       "username": "CPM_EDGE_MQTT_USERNAME", "password": "CPM_EDGE_MQTT_PASSWORD",
       "http": "CPM_EDGE_HTTP", "api_key_file": "CPM_EDGE_API_KEY_FILE"}
ENV_INT = {"prefill_chunk": "CPM_EDGE_PREFILL_CHUNK"}
DEFAULT_PREFILL_CHUNK = 512  # tokens per prefill call when neither the settings nor the bundle say
MQTT_VERSIONS = ("5", "3.1.1")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a device id, pool or group: one topic level, no wildcards
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self):
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str, key: str = "--broker") -> BrokerAddress:
    """mqtt://HOST[:PORT] (1883) or mqtts://HOST[:PORT] (8883); credentials never go in the URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise AgentInputError(f"{key} {url!r}: {e}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise AgentInputError(f"{key} {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    if parts.username or parts.password:
        raise AgentInputError(f"{key}: put credentials in --username and CPM_EDGE_MQTT_PASSWORD "
                              f"(or --password-file), not in the URL")
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise AgentInputError(f"{key} {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


@dataclass(frozen=True)
class HttpAddress:
    host: str
    port: int

    def __str__(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_http_address(value: str, key: str = "--http") -> HttpAddress:
    """HOST:PORT where the OpenAI-compatible HTTP API listens ([::1]:8000 for IPv6; port 0: any free port)."""
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError as e:
        raise AgentInputError(f"{key} {value!r}: {e} (expected HOST:PORT, e.g. 127.0.0.1:8000)") from None
    if not isinstance(value, str) or not parts.hostname or port is None or parts.path or parts.query \
            or parts.fragment or parts.username is not None:
        raise AgentInputError(f"{key} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8000 or 0.0.0.0:8000")
    return HttpAddress(parts.hostname, port)


def check_name(value, key: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise AgentInputError(f"{key} {value!r}: use 1-64 letters, digits, '_', '-' or '.' "
                              f"(one topic level: no '/', '+' or '#')")
    return value


@dataclass
class AgentConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    device_id: str = ""
    prefix: str = "cpm/v1"            # topics are <prefix>/<device_id>/...
    mqtt_version: str = "5"           # "3.1.1" for brokers without MQTT 5 (e.g. the embedded demo broker)
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    ca_file: Optional[str] = None     # mqtts: the CA that signed the broker's certificate (default: system CAs)
    cert_file: Optional[str] = None   # mqtts: client certificate and key, when the broker requires them
    key_file: Optional[str] = None
    fleet_group: Optional[str] = None  # also serve <prefix>/pool/<pool>/request through $share/<group>/...
    pool: Optional[str] = None
    qos: int = 1
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    session_expiry_s: int = 0         # > 0: persistent session, requests published while offline wait
    queue_size: int = 64              # requests waiting for a cache row; more are answered `busy`
    control_queue_size: int = 1024    # cancel/resend waiting for the scheduler (a queue apart from requests)
    prefill_chunk: Optional[int] = None  # prompt tokens per prefill step; None: the bundle's, else 512
    max_payload_bytes: int = 64 * 1024
    max_prompt_tokens: int = 0        # 0: what the model holds (max_seq - 1)
    max_tokens: int = 1024            # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_wait_s: float = 120.0         # a request not started this long after it arrived is answered `expired`
    chunk_tokens: int = 4             # stream a chunk every N tokens ...
    chunk_ms: float = 100.0           # ... or after this long, whichever first (the first token goes at once)
    telemetry_s: float = 10.0         # 0: no telemetry
    shutdown_grace_s: float = 5.0     # on stop, running requests get this long to finish
    finished_cache: int = 1024        # finals kept for `resend` after a broker restart
    finished_ttl_s: float = 300.0
    http: Optional[str] = None        # HOST:PORT: also serve the OpenAI-compatible HTTP API there (agent/http_api.py)
    api_key_file: Optional[str] = None  # with http: clients must send `Authorization: Bearer <the file's text>`

    @classmethod
    def from_sources(cls, env: Optional[dict] = None, **given) -> "AgentConfig":
        """Command-line values (None = not given) over environment over defaults."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            if given.get(f.name) is not None:
                values[f.name] = given[f.name]
            elif f.name in ENV and env.get(ENV[f.name]):
                values[f.name] = env[ENV[f.name]]
            elif f.name in ENV_INT and env.get(ENV_INT[f.name]):
                try:
                    values[f.name] = int(env[ENV_INT[f.name]])
                except ValueError:
                    raise AgentInputError(f"{ENV_INT[f.name]}={env[ENV_INT[f.name]]!r}: must be an integer") from None
        return cls(**values)

    @property
    def address(self) -> BrokerAddress:
        return parse_broker_url(self.broker)

    def validate(self) -> "AgentConfig":
        """Raise AgentInputError naming the first bad key; return self."""
        address = self.address
        check_name(self.device_id, "--device-id")
        if not _PREFIX.match(self.prefix or ""):
            raise AgentInputError(f"--prefix {self.prefix!r}: topic levels of letters, digits, '_', '-', '.'")
        if self.mqtt_version not in MQTT_VERSIONS:
            raise AgentInputError(f"--mqtt-version {self.mqtt_version!r}: one of {', '.join(MQTT_VERSIONS)}")
        if (self.fleet_group is None) != (self.pool is None):
            raise AgentInputError("--fleet-group and --pool: give both (a shared pool) or neither")
        if self.fleet_group is not None:
            check_name(self.fleet_group, "--fleet-group")
            check_name(self.pool, "--pool")
        if self.password is not None and self.username is None:
            raise AgentInputError("password given without a username (--username or CPM_EDGE_MQTT_USERNAME)")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None:
                if not address.tls:
                    raise AgentInputError(f"--{key.replace('_', '-')}: needs an mqtts:// broker URL")
                if not Path(path).is_file():
                    raise AgentInputError(f"--{key.replace('_', '-')} {path}: file not found")
        if (self.cert_file is None) != (self.key_file is None):
            raise AgentInputError("--cert-file and --key-file: give both or neither")
        if self.qos not in (0, 1):
            raise AgentInputError(f"qos {self.qos!r}: 0 or 1")
        for key in ("queue_size", "max_payload_bytes", "max_tokens", "default_max_tokens", "chunk_tokens",
                    "keepalive_s", "finished_cache", "control_queue_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AgentInputError(f"{key} {value!r}: must be an integer >= 1")
        chunk = self.prefill_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise AgentInputError(f"prefill_chunk {chunk!r} (--prefill-chunk, CPM_EDGE_PREFILL_CHUNK): "
                                  f"must be an integer >= 1")
        for key in ("max_prompt_tokens", "session_expiry_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AgentInputError(f"{key} {value!r}: must be an integer >= 0")
        if self.default_max_tokens > self.max_tokens:
            raise AgentInputError(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens "
                                  f"{self.max_tokens}")
        for key in ("max_wait_s", "chunk_ms", "telemetry_s", "shutdown_grace_s", "finished_ttl_s",
                    "reconnect_min_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise AgentInputError(f"{key} {value!r}: must be a number >= 0")
        if not self.reconnect_min_s <= self.reconnect_max_s:
            raise AgentInputError("reconnect_max_s must be >= reconnect_min_s")
        if self.http is not None:
            parse_http_address(self.http)
        if self.api_key_file is not None:
            if self.http is None:
                raise AgentInputError(f"--api-key-file {self.api_key_file}: needs --http (the key guards the HTTP API)")
            self.read_api_key()
        return self

    @property
    def http_address(self) -> Optional[HttpAddress]:
        return None if self.http is None else parse_http_address(self.http)

    def read_api_key(self) -> Optional[str]:
        """The HTTP API key: the api_key_file's text without surrounding whitespace (None: no key asked)."""
        if self.api_key_file is None:
            return None
        try:
            key = Path(self.api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise AgentInputError(f"--api-key-file {self.api_key_file}: cannot read ({why})") from None
        if not key or any(c.isspace() or not c.isprintable() for c in key):
            raise AgentInputError(f"--api-key-file {self.api_key_file}: must hold one key, printable characters "
                                  f"without spaces (e.g. from `openssl rand -hex 32`)")
        return key

    def redacted(self) -> dict:
        """Every setting, for logs: the password replaced by '***'."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["password"] is not None:
            out["password"] = "***"
        return out
