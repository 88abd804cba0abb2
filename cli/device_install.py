"""What `cpm-edge flash` puts on a device, as one install that runs on the device itself.

`flash --host local:ROOT` runs `install()` here, with ROOT as the device's `/`; `flash --host user@host`
copies the bundle and the kit's wheel to the device and runs the same install there (`local:/`), so the
layout, the unit and the settings come from one place:

    ROOT/opt/cpm-edge/bundle/          the bundle (read-only to the agent), sha256-checked, with its seal
    ROOT/opt/cpm-edge/.venv/           python3 -m venv --system-site-packages + the kit's wheel and extras
    ROOT/opt/cpm-edge/wheels/          the wheel that was installed
    ROOT/etc/cpm-edge/agent.env        broker, device id, credentials (mode 0600)
    ROOT/etc/cpm-edge/{ca.crt,client.crt,client.key}   with an mqtts:// broker, when given
    ROOT/etc/systemd/system/cpm-edge-agent.service      rendered from devices/systemd/*.service.in
    ROOT/var/lib/cpm-edge/             the state folder (systemd's StateDirectory=): engines built here

Why --system-site-packages: JetPack installs TensorRT's Python bindings for the system python only (in
/usr/lib/python3.X/dist-packages, built against that python's ABI; PyPI has no TensorRT wheel for Jetson),
so the venv is made from /usr/bin/python3 and sees them. Its own site-packages come first, so the kit's
pinned dependencies win over older Debian ones.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from agent.errors import AgentInputError

KIT_ROOT = Path(__file__).resolve().parents[1]
UNIT_TEMPLATE = KIT_ROOT / "devices" / "systemd" / "cpm-edge-agent.service.in"
UNIT_NAME = "cpm-edge-agent.service"
OPT = "/opt/cpm-edge"
VENV = f"{OPT}/.venv"
BUNDLE = f"{OPT}/bundle"
ETC = "/etc/cpm-edge"
STATE = "/var/lib/cpm-edge"
SERVICE_USER = "cpm-edge"
GPU_GROUPS = "video render"  # Jetson: /dev/nvhost-*, /dev/nvmap (video); /dev/dri/renderD* (render)
TLS_FILES = {"ca_file": "ca.crt", "cert_file": "client.crt", "key_file": "client.key"}
DEFAULT_BROKER = "mqtt://localhost:1883"


@dataclass
class DeviceSettings:
    """What the flashed agent is told. Files are paths on the machine that runs the install."""
    broker: Optional[str] = None      # None: keep agent.env's, else DEFAULT_BROKER
    device_id: str = ""               # "" : keep agent.env's, else the bundle's profile name
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    username: Optional[str] = None
    password_file: Optional[str] = None
    keep_onnx: bool = False           # keep model.onnx once the device has built its engine


_PLAIN = re.compile(r"^[A-Za-z0-9_.,:/@%+=~-]*$")


def env_line(key: str, value: str) -> str:
    """KEY=VALUE as systemd's EnvironmentFile (and sh) read it: anything but plain characters in single
    quotes, inside which nothing is special; a value holding a single quote or a line break is refused."""
    if _PLAIN.match(value):
        return f"{key}={value}"
    if "'" in value or "\n" in value or "\r" in value:
        raise AgentInputError(f"agent.env: the value of {key} holds a single quote or a line break, which an "
                              f"EnvironmentFile cannot carry here; choose another value")
    return f"{key}='{value}'"


def read_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile as env_line writes them (comments and blank lines skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            out[key.strip()] = value
    return out


def resolve(settings: DeviceSettings, manifest: dict, existing_env: dict[str, str]) -> DeviceSettings:
    """Fill broker and device id from agent.env already on the device, else the defaults; refuse a bad
    setting with one line (exit 2) before anything is written."""
    from agent.config import check_name, parse_broker_url

    broker = settings.broker or existing_env.get("CPM_EDGE_BROKER") or DEFAULT_BROKER
    device_id = settings.device_id or existing_env.get("CPM_EDGE_DEVICE_ID") or manifest["device"]
    tls = parse_broker_url(broker).tls
    check_name(device_id, "--device-id")
    for key in TLS_FILES:
        path = getattr(settings, key)
        if path is None:
            continue
        if not tls:
            raise AgentInputError(f"--{key.replace('_', '-')} {path}: needs an mqtts:// broker (--broker is {broker})")
        if not Path(path).is_file():
            raise AgentInputError(f"--{key.replace('_', '-')} {path}: file not found")
    if (settings.cert_file is None) != (settings.key_file is None):
        raise AgentInputError("--cert-file and --key-file: give both or neither")
    if settings.password_file is not None:
        if settings.username is None:
            raise AgentInputError("--password-file: give --username too")
        if not Path(settings.password_file).is_file():
            raise AgentInputError(f"--password-file {settings.password_file}: file not found")
    return DeviceSettings(broker, device_id, settings.ca_file, settings.cert_file, settings.key_file,
                          settings.username, settings.password_file, settings.keep_onnx)


def exec_start(settings: DeviceSettings) -> list[str]:
    """The agent's command line in the unit: TLS flags only with mqtts:// and only for the files given."""
    from agent.config import parse_broker_url

    argv = [f"{VENV}/bin/cpm-edge", "agent", "--bundle", BUNDLE, "--state-dir", STATE]
    if parse_broker_url(settings.broker).tls:
        for key, name in TLS_FILES.items():
            if getattr(settings, key) is not None:
                argv += [f"--{key.replace('_', '-')}", f"{ETC}/{name}"]
    return argv


def gpu_groups(root: Path) -> str:
    """GPU_GROUPS that exist on the device (systemd refuses to start a unit naming a missing group); all of
    them when ROOT has no /etc/group (a folder being prepared)."""
    group_file = Path(root) / "etc" / "group"
    if not group_file.exists():
        return GPU_GROUPS
    names = {line.split(":", 1)[0] for line in group_file.read_text().splitlines() if line}
    return " ".join(g for g in GPU_GROUPS.split() if g in names)


def render_unit(settings: DeviceSettings, manifest: dict, template: Path = UNIT_TEMPLATE,
                groups: str = GPU_GROUPS) -> str:
    groups = "" if manifest.get("backend") == "onnxruntime" else groups
    try:
        text = Path(template).read_text()
    except OSError as e:
        raise AgentInputError(f"unit template {template}: cannot read ({e.strerror}); pass --unit-template "
                              f"(devices/systemd/cpm-edge-agent.service.in of the kit's sources)") from None
    for key, value in (("@EXEC_START@", shlex.join(exec_start(settings))), ("@GROUPS@", groups)):
        text = text.replace(key, value)
    return text


def env_text(settings: DeviceSettings, existing: dict[str, str]) -> str:
    """agent.env: the keys flash manages, then any other line the user added (kept as it was)."""
    values = {"CPM_EDGE_BROKER": settings.broker, "CPM_EDGE_DEVICE_ID": settings.device_id}
    if settings.username is not None:
        values["CPM_EDGE_MQTT_USERNAME"] = settings.username
    if settings.password_file is not None:
        values["CPM_EDGE_MQTT_PASSWORD"] = Path(settings.password_file).read_text().rstrip("\r\n")
    kept = {k: v for k, v in existing.items() if k not in values}
    lines = [env_line(k, v) for k, v in {**values, **kept}.items()]
    return ("# cpm-edge agent settings (written by cpm-edge flash; other keys you add are kept). Mode 0600.\n"
            + "\n".join(lines) + "\n")


def venv_extras(manifest: dict) -> str:
    """The kit's extras a device needs for this bundle: the agent, its runtime, the CUDA driver binding."""
    if manifest.get("backend") == "onnxruntime":
        return "agent,onnxruntime"
    cuda = "cuda12" if (manifest.get("jetpack") or "").startswith(("5", "6")) else "cuda13"
    return f"agent,{cuda}" + (",tensorrt-rtx" if manifest["trt_flavour"] == "tensorrt-rtx" else "")


def write_atomic(path: Path, data: bytes, mode: int):
    """Temp file, mode set, then rename: never a half-written settings file or unit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def default_python() -> str:
    """The device's system python (where JetPack's TensorRT lives); this one's base where there is none."""
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else getattr(sys, "_base_executable",
                                                                                sys.executable)


def install_venv(root: Path, wheel: Path, manifest: dict, python: str, progress) -> float:
    """Create ROOT/opt/cpm-edge/.venv when missing and install the wheel with its extras; returns seconds."""
    venv = root / VENV.lstrip("/")
    start = time.perf_counter()
    if not (venv / "bin" / "python").exists():
        progress(f"creating {venv} ({python} -m venv --system-site-packages)")
        run([python, "-m", "venv", "--system-site-packages", str(venv)], "creating the venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    extras = venv_extras(manifest)
    progress(f"installing {wheel.name}[{extras}] into {venv}")
    run(pip + [f"{wheel}[{extras}]"], "installing the agent's packages")
    run(pip + ["--force-reinstall", "--no-deps", str(wheel)], "installing the kit")  # same version, new code
    return time.perf_counter() - start


def run(cmd: list[str], what: str):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise AgentInputError(f"{what} failed (`{shlex.join(cmd)[:120]}` exited {proc.returncode}): {last[0]}")


def place_bundle(source: Path, root: Path, progress) -> tuple[Path, dict]:
    """Copy (or move, when it was sent beside it) the bundle into ROOT/opt/cpm-edge/bundle: staged, the full
    sha256 pass on the copy, sealed for the cheap start check, then swapped in by rename."""
    from agent.bundle_check import read_manifest, verify_files, write_seal

    opt = root / OPT.lstrip("/")
    opt.mkdir(parents=True, exist_ok=True)
    staging = opt / ".bundle.incoming"
    shutil.rmtree(staging, ignore_errors=True)
    if source.resolve().is_relative_to(opt.resolve()):
        source.rename(staging)  # sent by the ssh flash into /opt/cpm-edge/incoming: same file system
    else:
        shutil.copytree(source, staging)
    for path in [staging, *staging.rglob("*")]:  # readable by the service user, writable by root only
        path.chmod(0o755 if path.is_dir() else 0o644)
    manifest = read_manifest(staging)
    progress(f"verified {verify_files(staging, manifest)} files on the device side (sha256)")
    write_seal(staging, manifest)
    final, old = opt / "bundle", opt / ".bundle.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final, manifest


def install(root: Path, bundle: Path, wheel: Path, settings: DeviceSettings, python: str | None = None,
            progress=lambda stage: None, unit_template: Path = UNIT_TEMPLATE) -> dict:
    """The whole device install under root (the device's `/`); returns facts for the report."""
    from agent.bundle_check import drop_onnx, engine_file, read_manifest

    root = Path(root)
    env_path = root / ETC.lstrip("/") / "agent.env"
    existing = read_env(env_path.read_text()) if env_path.exists() else {}
    settings = resolve(settings, read_manifest(bundle), existing)  # bad settings: exit 2, nothing written
    unit_text = render_unit(settings, read_manifest(bundle), unit_template, gpu_groups(root))
    env = env_text(settings, existing)
    final, manifest = place_bundle(bundle, root, progress)
    wheels = root / OPT.lstrip("/") / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if wheel.resolve() != (wheels / wheel.name).resolve():
        shutil.copy2(wheel, wheels / wheel.name)
    venv_seconds = install_venv(root, wheels / wheel.name, manifest, python or default_python(), progress)
    etc = root / ETC.lstrip("/")
    for key, name in TLS_FILES.items():
        if getattr(settings, key) is not None:
            write_atomic(etc / name, Path(getattr(settings, key)).read_bytes(), 0o600 if key == "key_file" else 0o644)
    write_atomic(env_path, env.encode(), 0o600)
    unit = root / "etc" / "systemd" / "system" / UNIT_NAME
    write_atomic(unit, unit_text.encode(), 0o644)
    state = root / STATE.lstrip("/")
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o750)
    on_device = str(root.resolve()) == "/"
    if on_device and manifest.get("backend") != "onnxruntime" and not manifest.get("engine"):
        manifest = build_engine_here(final, progress)
    if not settings.keep_onnx and engine_file(final, manifest, state) is not None:
        progress(f"removed {', '.join(drop_onnx(final, manifest))} from the bundle: its engine is built "
                 f"(flash --keep-onnx keeps it, to rebuild after a TensorRT upgrade)")
    facts = {"root": str(root), "bundle": str(final), "unit": str(unit), "venv_seconds": round(venv_seconds, 1),
             "broker": settings.broker, "device_id": settings.device_id, "started": False}
    if on_device:
        activate(settings, manifest, progress)
        facts["started"] = True
    else:
        progress(f"installed into {root}, a folder: no user created, nothing started (on the device itself, "
                 f"flash --host local:/ does both)")
    return facts


def build_engine_here(bundle: Path, progress) -> dict:
    """On the device, as root: build its engine with the device's TensorRT now rather than at the agent's
    first start (minutes for an 8B model; its output goes to this terminal), then seal the bundle again.
    It goes into the bundle, where agent/tensorrt_backend.py reads it; `engine build --state-dir` puts it in
    the state folder instead once the backend reads agent.bundle_check.engine_file()."""
    from agent.bundle_check import read_manifest

    cmd = [f"{VENV}/bin/cpm-edge", "engine", "build", "--bundle", str(bundle)]
    progress(f"building the engine on this device: {shlex.join(cmd)}")
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise AgentInputError(f"building the engine on this device failed (exit {code}, its reason is above); the "
                              f"bundle is installed: fix the cause and run `{shlex.join(cmd)}`")
    return read_manifest(bundle)  # now listing the engine (and sealed again by engine build)


def activate(settings: DeviceSettings, manifest: dict, progress):
    """On the device itself: the service user, the key readable by it, systemd told, the agent started."""
    groups = [g for g in GPU_GROUPS.split() if manifest.get("backend") != "onnxruntime" and group_exists(g)]
    if subprocess.run(["id", SERVICE_USER], capture_output=True).returncode != 0:
        run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", STATE,
             "--shell", "/usr/sbin/nologin", *(["--groups", ",".join(groups)] if groups else []), SERVICE_USER],
            f"creating the user {SERVICE_USER}")
    if settings.key_file is not None:
        shutil.chown(f"{ETC}/client.key", user=SERVICE_USER)
    for path in [Path(STATE), *Path(STATE).rglob("*")]:  # what systemd's StateDirectory= would do at start
        shutil.chown(path, user=SERVICE_USER, group=SERVICE_USER)
    if not Path("/run/systemd/system").is_dir():
        progress("systemd is not running here: start the agent with `systemctl enable --now cpm-edge-agent` "
                 "once it is")
        return
    for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", UNIT_NAME.removesuffix(".service")],
                ["systemctl", "restart", UNIT_NAME.removesuffix(".service")]):
        progress(shlex.join(cmd))
        run(cmd, shlex.join(cmd))
    progress("started; logs: journalctl -u cpm-edge-agent -f")


def group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False
