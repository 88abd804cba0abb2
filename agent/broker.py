"""A small embedded MQTT 3.1.1 broker: the demo's fallback when no Mosquitto can be installed.

Enough for a loopback demo and for tests, not for production: QoS 0 and 1 (a QoS 2 publish is acknowledged
with the full PUBREC/PUBREL/PUBCOMP exchange and delivered at most at QoS 1), retained messages, last wills,
`+` and `#` wildcards, keepalive, client-id takeover. Sessions are always clean (CONNACK session present = 0);
no authentication, no TLS, no shared subscriptions, no MQTT 5 (a v5 CONNECT is refused with return code 1,
so run the agent and clients with --mqtt-version 3.1.1).

    python -m agent.broker --port 1883
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("cpm-edge.broker")

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
MAX_PACKET = 16 * 1024 * 1024


class ProtocolViolation(Exception):
    pass


def topic_matches(filt: str, topic: str) -> bool:
    """MQTT filter matching: '+' one level, '#' the rest (also the parent); wildcards never match '$' topics."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    f, t = filt.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def valid_filter(filt: str) -> bool:
    if not filt or "\x00" in filt:
        return False
    levels = filt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _utf8(data: bytes, at: int) -> tuple[str, int]:
    if at + 2 > len(data):
        raise ProtocolViolation("truncated string")
    n = struct.unpack_from("!H", data, at)[0]
    if at + 2 + n > len(data):
        raise ProtocolViolation("truncated string")
    try:
        return data[at + 2:at + 2 + n].decode("utf-8"), at + 2 + n
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid UTF-8") from None


def _bin(data: bytes, at: int) -> tuple[bytes, int]:
    if at + 2 > len(data):
        raise ProtocolViolation("truncated field")
    n = struct.unpack_from("!H", data, at)[0]
    return data[at + 2:at + 2 + n], at + 2 + n


def _s(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([(kind << 4) | flags]) + bytes(length) + body


@dataclass
class _Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class _Session:
    client_id: str
    writer: asyncio.StreamWriter
    subs: dict = field(default_factory=dict)  # filter -> granted qos
    will: Optional[_Will] = None
    next_id: int = 0

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host, self.port = host, port
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, tuple[bytes, int]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()

    # --- running --------------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> int:
        """Serve on a background thread; returns the port (useful with port=0)."""
        self._thread = threading.Thread(target=self._run, name="cpm-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._server is None:
            raise OSError(f"the embedded broker could not listen on {self.host}:{self.port}")
        return self.port

    def _run(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._listen())
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", self.host, self.port, e)
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _listen(self):
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self):
        if self._loop is None or self._server is None:
            return

        async def shutdown():
            self._server.close()
            for s in list(self.sessions.values()):
                s.writer.close()
            await asyncio.sleep(0)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)

    # --- one connection -------------------------------------------------------------------------------
    async def _read_packet(self, reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        head = await reader.readexactly(1)
        length, shift = 0, 0
        for _ in range(4):
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            raise ProtocolViolation("malformed remaining length")
        if length > MAX_PACKET:
            raise ProtocolViolation(f"packet of {length} bytes is too large")
        return head[0] >> 4, head[0] & 0x0F, await reader.readexactly(length)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session: Optional[_Session] = None
        clean_exit = False
        try:
            kind, _, body = await asyncio.wait_for(self._read_packet(reader), 10)
            if kind != CONNECT:
                raise ProtocolViolation("first packet is not CONNECT")
            session, keepalive = self._connect(body, writer)
            if session is None:
                return
            timeout = keepalive * 1.5 if keepalive else None
            while True:
                kind, flags, body = await asyncio.wait_for(self._read_packet(reader), timeout)
                if kind == DISCONNECT:
                    clean_exit = True
                    return
                self._handle(session, kind, flags, body)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ProtocolViolation,
                IndexError, struct.error) as e:
            if isinstance(e, (ProtocolViolation, IndexError, struct.error)):
                log.info("closing %s: %s", session.client_id if session else "client", e)
        finally:
            if session is not None and self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
                if not clean_exit and session.will is not None:
                    w = session.will
                    self._route(w.topic, w.payload, w.qos, w.retain)
            writer.close()

    def _connect(self, body: bytes, writer) -> tuple[Optional[_Session], int]:
        name, at = _utf8(body, 0)
        if at + 4 > len(body):
            raise ProtocolViolation("truncated CONNECT")
        level, flags = body[at], body[at + 1]
        keepalive = struct.unpack_from("!H", body, at + 2)[0]
        at += 4
        if name != "MQTT" or level != 4:
            writer.write(_packet(CONNACK, 0, b"\x00\x01"))  # unacceptable protocol version
            return None, 0
        client_id, at = _utf8(body, at)
        will = None
        if flags & 0x04:
            topic, at = _utf8(body, at)
            payload, at = _bin(body, at)
            will = _Will(topic, payload, min((flags >> 3) & 3, 1), bool(flags & 0x20))
        if not client_id:
            client_id = f"auto-{id(writer):x}"
        old = self.sessions.pop(client_id, None)
        if old is not None:
            old.writer.close()  # takeover: the older connection goes (without its will, as its session moved)
        session = _Session(client_id, writer, will=will)
        self.sessions[client_id] = session
        writer.write(_packet(CONNACK, 0, b"\x00\x00"))
        return session, keepalive

    def _handle(self, session: _Session, kind: int, flags: int, body: bytes):
        w = session.writer
        if kind == PUBLISH:
            qos, retain = (flags >> 1) & 3, bool(flags & 1)
            if qos == 3:
                raise ProtocolViolation("QoS 3")
            topic, at = _utf8(body, 0)
            if not topic or "+" in topic or "#" in topic:
                raise ProtocolViolation("invalid topic name")
            if qos:
                pid = body[at:at + 2]
                at += 2
                w.write(_packet(PUBACK if qos == 1 else PUBREC, 0, pid))
            self._route(topic, body[at:], min(qos, 1), retain)
        elif kind == PUBREL:
            w.write(_packet(PUBCOMP, 0, body[:2]))
        elif kind == SUBSCRIBE:
            pid, at, granted, new = body[:2], 2, [], []
            while at < len(body):
                filt, at = _utf8(body, at)
                qos = body[at] & 3
                at += 1
                if not valid_filter(filt):
                    granted.append(0x80)
                    continue
                session.subs[filt] = min(qos, 1)
                granted.append(min(qos, 1))
                new.append(filt)
            w.write(_packet(SUBACK, 0, pid + bytes(granted)))
            for filt in new:
                for topic, (payload, rqos) in list(self.retained.items()):
                    if topic_matches(filt, topic):
                        self._send(session, topic, payload, min(rqos, session.subs[filt]), retain=True)
        elif kind == UNSUBSCRIBE:
            at = 2
            while at < len(body):
                filt, at = _utf8(body, at)
                session.subs.pop(filt, None)
            w.write(_packet(UNSUBACK, 0, body[:2]))
        elif kind == PINGREQ:
            w.write(_packet(PINGRESP, 0, b""))
        elif kind in (PUBACK, PUBREC, PUBCOMP):
            if kind == PUBREC:
                w.write(_packet(PUBREL, 2, body[:2]))
        else:
            raise ProtocolViolation(f"unexpected packet type {kind}")

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool):
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        for s in list(self.sessions.values()):
            granted = [q for f, q in s.subs.items() if topic_matches(f, topic)]
            if granted:
                self._send(s, topic, payload, min(qos, max(granted)), retain=False)

    def _send(self, session: _Session, topic: str, payload: bytes, qos: int, retain: bool):
        flags = (qos << 1) | int(retain)
        body = _s(topic) + (struct.pack("!H", session.packet_id()) if qos else b"") + payload
        session.writer.write(_packet(PUBLISH, flags, body))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.broker", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="cpm-edge broker: %(message)s")
    broker = EmbeddedBroker(args.host, args.port)
    port = broker.start()
    print(f"embedded MQTT 3.1.1 broker listening on {args.host}:{port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
