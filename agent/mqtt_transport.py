"""The thin paho-mqtt 2.x adapter between a broker and AgentServer (which knows nothing of MQTT).

Subscriptions are made in on_connect, so a reconnect re-subscribes; paho's network thread reconnects with
exponential backoff (reconnect_min_s .. reconnect_max_s) and keeps QoS 1 replies published while the broker
was away, sending them once it is back. The retained status topic says loading / online, and the broker
publishes the last will `offline` when the agent vanishes. `online` goes out only once the broker granted
every subscription (v5 reason codes, v3.1.1 granted QoS; 0x80 and above is a refusal); a refused one is
logged as an error and the status says `error` with the refused topics. TCP_NODELAY is set on the socket: replies are
small and latency matters more than packet count.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import protocol as P
from agent.config import AgentConfig, BrokerAddress

log = logging.getLogger("cpm-edge.agent")


def _nodelay(client, userdata, sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. a websocket wrapper): nothing to tune


def make_client(client_id: str, address: BrokerAddress, mqtt_version: str = "5", *,
                username: Optional[str] = None, password: Optional[str] = None, ca_file: Optional[str] = None,
                cert_file: Optional[str] = None, key_file: Optional[str] = None,
                clean_session: bool = True) -> mqtt.Client:
    """A paho client with credentials, TLS and TCP_NODELAY set up (shared by the agent and AgentClient)."""
    v5 = mqtt_version == "5"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                         clean_session=None if v5 else clean_session)
    client.on_socket_open = _nodelay
    if username is not None:
        client.username_pw_set(username, password)
    if address.tls:
        client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file, cert_reqs=ssl.CERT_REQUIRED,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.max_inflight_messages_set(256)
    return client


def v5_properties(packet_type, **values) -> Optional[Properties]:
    props = Properties(packet_type)
    for key, value in values.items():
        if value is not None:
            setattr(props, key, value)
    return props


class MqttTransport:
    """Connects one device agent to its broker; hands every received message to `on_message(Inbound)`."""

    def __init__(self, config: AgentConfig, on_message: Optional[Callable[[P.Inbound], None]] = None,
                 client_id: Optional[str] = None):
        self.config = config
        self.on_message = on_message
        self.topics = P.Topics(config.prefix, config.device_id, config.pool, config.fleet_group)
        self.v5 = config.mqtt_version == "5"
        self.address = config.address
        self.state, self.state_info = "loading", {}
        self.ready = False  # subscribe only once a server can take requests (status `loading` until then)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.last_error: Optional[str] = None
        self.connects = 0
        self._lock = threading.Lock()
        self.client = make_client(client_id or f"cpm-edge-agent-{config.device_id}", self.address,
                                  config.mqtt_version, username=config.username, password=config.password,
                                  ca_file=config.ca_file, cert_file=config.cert_file, key_file=config.key_file,
                                  clean_session=config.session_expiry_s == 0)
        self.client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        self.client.will_set(self.topics.status, P.status_payload("offline", config.device_id), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.refused_publishes = 0
        self._stopping = False
        self.subscribed_ok = False     # the last SUBACK granted every subscription
        self.refused_topics: list[str] = []
        self.on_granted: Optional[Callable[[], None]] = None  # called after each SUBACK that grants everything

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self):
        """Connect in the background (retrying with backoff until the broker answers)."""
        props = None
        if self.v5 and self.config.session_expiry_s:
            props = v5_properties(PacketTypes.CONNECT, SessionExpiryInterval=self.config.session_expiry_s)
        kwargs = {"clean_start": self.config.session_expiry_s == 0, "properties": props} if self.v5 else {}
        self.client.connect_async(self.address.host, self.address.port, self.config.keepalive_s, **kwargs)
        self.client.loop_start()

    def stop(self, timeout: float = 3.0):
        """Publish `offline` (retained), disconnect cleanly (no will), stop the network thread."""
        if self.connected.is_set():
            info = self.client.publish(self.topics.status, P.status_payload("offline", self.config.device_id),
                                       qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass  # the connection went away meanwhile: the will says offline instead
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def set_state(self, state: str, **info):
        """Retained status: loading / online (offline is the will and the clean stop; `error` replaces
        online while a subscription is refused)."""
        with self._lock:
            self.state, self.state_info = state, info
        if self.connected.is_set() and (not self.ready or self.subscribed.is_set()):
            self._publish_state()  # once serving, `online` goes out only after the SUBACK (see _on_subscribe)

    def _publish_state(self):
        with self._lock:
            state, info = self.state, self.state_info
            if self.ready and self.refused_topics:
                state, info = "error", {"error": f"subscription refused: {', '.join(self.refused_topics)}"}
            payload = P.status_payload(state, self.config.device_id, **info)
        self.client.publish(self.topics.status, payload, qos=1, retain=True)

    # --- outgoing -----------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, correlation_data: Optional[bytes] = None, retain: bool = False):
        props = None
        if self.v5 and correlation_data is not None:
            props = v5_properties(PacketTypes.PUBLISH, CorrelationData=correlation_data)
        self.client.publish(topic, payload, qos=self.config.qos, retain=retain, properties=props)

    # --- paho callbacks (network thread) ------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.last_error = f"broker {self.address} refused the connection: {reason_code}"
            log.error("%s", self.last_error)
            return
        self.connects += 1
        self.connected.set()
        log.info("connected to %s (%s)", self.address, "reconnect" if self.connects > 1 else "first")
        if self.ready:
            self._subscribe()
        else:
            self._publish_state()

    def serve(self, on_message: Callable[[P.Inbound], None]):
        """Start taking requests: subscribe now if connected, and on every (re)connect from now on."""
        self.on_message = on_message
        self.ready = True
        if self.connected.is_set():
            self._subscribe()

    def _subscribe(self):
        subs = [(topic, self.config.qos) for topic, _ in self.topics.subscriptions()]
        self.client.subscribe(subs)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        # Every SUBSCRIBE of this client is the full list (its SUBACK may even come back before
        # client.subscribe() has returned the mid on another thread, so the mid is not compared).
        # paho (CallbackAPIVersion.VERSION2) hands ReasonCode objects for both protocol versions: the v5
        # reason code, or the v3.1.1 granted QoS, where 0x80 is a refusal; is_failure means value >= 0x80.
        topics = [topic for topic, _ in self.topics.subscriptions()]
        codes = list(reason_codes)
        refused = [topic for topic, rc in zip(topics, codes) if rc.is_failure] + topics[len(codes):]
        with self._lock:
            self.refused_topics = refused
        if refused:
            self.last_error = (f"broker {self.address} refused the subscription to {', '.join(refused)} "
                               f"({', '.join(str(rc) for rc in codes if rc.is_failure) or 'no reason code'}); "
                               f"status stays not online: check the ACL of user {self.config.username!r}")
            log.error("%s", self.last_error)
        self.subscribed_ok = not refused
        self.subscribed.set()
        self._publish_state()
        if not refused and self.on_granted is not None:
            self.on_granted()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        """MQTT v5 PUBACKs carry the broker's verdict: an ACL that denies our topics shows up here."""
        if reason_code.is_failure:
            self.refused_publishes += 1
            self.last_error = (f"broker {self.address} refused a publish ({reason_code}): check the ACL of user "
                               f"{self.config.username!r} for {self.topics.of('status')}, "
                               f"{self.topics.of('telemetry')} and the reply topics")
            if self.refused_publishes in (1, 10, 100, 1000):
                log.error("%s [%d so far]", self.last_error, self.refused_publishes)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.subscribed.clear()
        if self._stopping:
            log.info("disconnected from %s", self.address)
            return
        log.warning("disconnected from %s (%s); reconnecting with backoff", self.address, reason_code)

    def _on_message(self, client, userdata, msg):
        props = msg.properties if self.v5 else None
        inbound = P.Inbound(topic=msg.topic, payload=msg.payload,
                            response_topic=getattr(props, "ResponseTopic", None),
                            correlation_data=getattr(props, "CorrelationData", None),
                            expiry_s=getattr(props, "MessageExpiryInterval", None))
        try:
            self.on_message(inbound)
        except Exception:  # never let a handler bug kill the network thread
            log.exception("handling a message on %s failed", msg.topic)
