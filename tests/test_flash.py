"""`make flash` gives a device that starts: a devices/cpu bundle flashed with local:ROOT (ROOT as the device's
`/`), its unit checked by the real `systemd-analyze verify`, the agent started the way systemd would start it
(the installed unit's ExecStart, EnvironmentFile, User, StateDirectory, NOTIFY_SOCKET), and asked a question
over a real Mosquitto with `cpm-edge ask`; the answer must be the torch model's greedy tokens (golden.json).

As root the agent runs as the unit's user (created like `flash --host local:/` creates it on a device, and
left in place); otherwise as the current user, since no other user can be switched to.
"""
from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cli_helpers import run_cli
from mqtt_fixtures import MOSQUITTO, Mosquitto

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
CPM = str(Path(sys.executable).with_name("cpm-edge"))
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (make "
                                                                             "setup installs Debian's systemd as root)")


def unit_service(text: str) -> dict[str, list[str]]:
    """The [Service] section of a unit as key -> values (systemd allows a key more than once)."""
    section, out = None, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def analyze(root: Path, unit: str) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` inside ROOT (systemd's own units copied in, as on any device)."""
    system = root / "usr" / "lib" / "systemd" / "system"
    if not system.exists():
        system.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree("/usr/lib/systemd/system", system, symlinks=True)
    return subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", unit], capture_output=True, text=True)


@pytest.fixture(scope="module")
def cpu_bundle(tiny_models, tmp_path_factory):
    from agent.tokenizer import Tokenizer
    from export.bundle import BundleOptions, make_bundle

    import yaml

    from export.profiles import load_profile

    folder = tmp_path_factory.mktemp("cpu")
    raw = yaml.safe_load(Path(load_profile("cpu").path).read_text())
    profile = folder / "cpu.yaml"  # devices/cpu/cpu.yaml at the tiny model's context (1024 positions)
    profile.write_text(yaml.safe_dump({**raw, "max_context": 512}))
    make_bundle(BundleOptions(str(profile), folder / "bundle", str(tiny_models["dense"])),
                lambda d: Tokenizer(d).encode)
    return folder / "bundle"


@pytest.fixture(scope="module")
def broker_module(tmp_path_factory):
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (make setup installs it as root: apt-get install mosquitto)")
    b = Mosquitto(tmp_path_factory.mktemp("broker"), "allow_anonymous true").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def flashed(cpu_bundle, broker_module):
    """ROOT after `cpm-edge flash --host local:ROOT` (a folder others may traverse: the agent's user must)."""
    root = Path(tempfile.mkdtemp(prefix="cpm-flash-"))
    root.chmod(0o755)
    start = time.perf_counter()
    proc = subprocess.run([CPM, "flash", "--bundle", str(cpu_bundle), "--host", f"local:{root}",
                           "--broker", broker_module.url, "--device-id", "cpu-07"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    print(f"flash with venv: {time.perf_counter() - start:.1f} s; {proc.stderr.strip().splitlines()[-1]}")
    yield root, broker_module
    shutil.rmtree(root, ignore_errors=True)


def service_user(name: str) -> pwd.struct_passwd:
    """The unit's User=: created as flash creates it on a device when we are root, else this process's."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        name], check=True, capture_output=True)
    return pwd.getpwnam(name)


class UnitProcess:
    """The unit's main process started as systemd would: ROOT-prefixed paths, its environment, its user,
    its state folder, a notify socket that receives READY=1."""

    def __init__(self, root: Path, unit_name: str = "cpm-edge-agent.service"):
        from cli.device_install import read_env

        self.root = root
        self.unit = unit_service((root / "etc" / "systemd" / "system" / unit_name).read_text())
        self.argv = [str(root) + a[0:] if a.startswith("/") else a for a in shlex.split(self.unit["ExecStart"][0])]
        env_file = self.unit["EnvironmentFile"][0]
        self.env_values = read_env((root / env_file.lstrip("/")).read_text())
        self.user = service_user(self.unit["User"][0])
        self.state = root / "var" / "lib" / self.unit["StateDirectory"][0]
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(int(self.unit.get("StateDirectoryMode", ["0755"])[0], 8))
        os.chown(self.state, self.user.pw_uid, self.user.pw_gid)
        run_dir = Path(tempfile.mkdtemp(prefix="cpm-notify-", dir=root))
        run_dir.chmod(0o755)
        self.notify_path = run_dir / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify_path.chmod(0o777)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "UnitProcess":
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": self.user.pw_dir, "USER": self.user.pw_name, "LOGNAME": self.user.pw_name,
               "STATE_DIRECTORY": str(self.state), "NOTIFY_SOCKET": str(self.notify_path),
               "WATCHDOG_USEC": str(int(self.unit["WatchdogSec"][0]) * 1_000_000), **self.env_values}
        prefix = []
        if os.geteuid() == 0:
            prefix = ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--init-groups",
                      "--no-new-privs"]
        self.proc = subprocess.Popen(prefix + self.argv, env=env, cwd="/", stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> list[str]:
        """Notify messages until READY=1; fails if the process ends first."""
        deadline, seen = time.monotonic() + timeout, []
        self.notify.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                seen += self.notify.recv(4096).decode().split("\n")
            except socket.timeout:
                if self.proc.poll() is not None:
                    pytest.fail(f"the agent exited {self.proc.returncode} before READY=1:\n{self.proc.stdout.read()}")
                continue
            if "READY=1" in seen:
                return seen
        pytest.fail(f"no READY=1 within {timeout} s (got {seen})")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(getattr(signal, self.unit.get("KillSignal", ["SIGTERM"])[0]))
        try:
            out, _ = self.proc.communicate(timeout=int(self.unit["TimeoutStopSec"][0]))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.notify.close()
        return self.proc.returncode, out


@needs_systemd_analyze
def test_flashed_unit_passes_systemd_analyze_verify(flashed):
    root, _ = flashed
    result = analyze(root, "/etc/systemd/system/cpm-edge-agent.service")
    assert result.returncode == 0 and result.stderr == "", result.stderr  # unknown keys only warn: none allowed
    unit = unit_service((root / "etc" / "systemd" / "system" / "cpm-edge-agent.service").read_text())
    assert "2" in unit["RestartPreventExitStatus"][0].split() and unit["Restart"] == ["on-failure"]
    assert unit["StateDirectory"] == ["cpm-edge"] and "/opt/cpm-edge" in unit["ReadOnlyPaths"][0].split()
    assert "--ca-file" not in unit["ExecStart"][0]  # an mqtt:// broker: no TLS flags


def test_flashed_agent_starts_as_its_unit_says_and_answers_over_mqtt(flashed):
    from agent.tokenizer import Tokenizer

    root, broker = flashed
    bundle = root / "opt" / "cpm-edge" / "bundle"
    assert oct((root / "etc" / "cpm-edge" / "agent.env").stat().st_mode & 0o777) == "0o600"
    agent = UnitProcess(root).start()
    try:
        agent.wait_ready()
        golden = json.loads((bundle / "golden.json").read_text())["cases"][0]
        ask = subprocess.run([CPM, "ask", "--broker", broker.url, "--device", "cpu-07", "--temperature", "0",
                              "--max-tokens", str(len(golden["greedy"])), "--timeout", "60", golden["prompt"]],
                             capture_output=True, text=True, timeout=120)
        assert ask.returncode == 0, ask.stderr
    finally:
        code, log = agent.stop()
    tokenizer = Tokenizer(bundle)
    greedy = golden["greedy"]
    stop_at = next((i for i, t in enumerate(greedy) if t in tokenizer.eos_ids), len(greedy))
    assert ask.stdout.removesuffix("\n") == tokenizer.decode(greedy[:stop_at])
    assert code == 0, log  # SIGTERM: a clean stop
    assert "cheap start check passed" in log and "sha256 of every file" not in log, log
    if os.geteuid() == 0:
        assert agent.state.stat().st_uid == pwd.getpwnam("cpm-edge").pw_uid


def test_a_bad_setting_exits_2_which_the_unit_never_restarts(flashed):
    root, _ = flashed
    env = root / "etc" / "cpm-edge" / "agent.env"
    original = env.read_text()
    env.write_text(original.replace("CPM_EDGE_BROKER=mqtt://", "CPM_EDGE_BROKER=http://"))
    try:
        agent = UnitProcess(root).start()
        agent.proc.wait(60)
        code, log = agent.stop()
    finally:
        env.write_text(original)
    assert code == 2 and "http://" in log and len(log.strip().splitlines()) <= 3, log
    assert "2" in agent.unit["RestartPreventExitStatus"][0].split()


def test_a_file_changed_after_flash_gets_the_full_check_and_is_refused(flashed):
    root, _ = flashed
    golden = root / "opt" / "cpm-edge" / "bundle" / "golden.json"
    original, stat = golden.read_bytes(), golden.stat()
    golden.write_bytes(original + b" ")
    try:
        agent = UnitProcess(root).start()
        agent.proc.wait(60)
        code, log = agent.stop()
    finally:
        golden.write_bytes(original)
        os.utime(golden, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert code == 2, log
    assert "golden.json changed size or modification time" in log and "golden.json: sha256 differs" in log, log


@needs_systemd_analyze
def test_an_mqtts_broker_gets_the_tls_flags_and_a_valid_unit(flashed, cpu_bundle, tmp_path):
    from agent.bundle_check import read_manifest
    from cli.device_install import DeviceSettings, render_unit, resolve

    root, _ = flashed
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = resolve(DeviceSettings("mqtts://broker.lan", "orin-01", ca_file=str(ca)), read_manifest(cpu_bundle), {})
    text = render_unit(settings, read_manifest(cpu_bundle))
    assert unit_service(text)["ExecStart"][0].endswith("--ca-file /etc/cpm-edge/ca.crt")
    (root / "etc" / "systemd" / "system" / "cpm-edge-tls.service").write_text(text)
    result = analyze(root, "/etc/systemd/system/cpm-edge-tls.service")
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_ca_file_without_mqtts_is_refused_before_anything_is_written(cpu_bundle, tmp_path, capsys):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    code, _, err = run_cli(capsys, "flash", "--bundle", cpu_bundle, "--host", f"local:{tmp_path / 'dev'}",
                           "--broker", "mqtt://broker.lan:1883", "--ca-file", ca)
    assert code == 2 and "needs an mqtts:// broker" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "dev").exists()
    code, _, err = run_cli(capsys, "flash", "--bundle", cpu_bundle, "--host", f"local:{tmp_path / 'dev'}",
                           "--device-id", "orin/01")
    assert code == 2 and "--device-id" in err and not (tmp_path / "dev").exists()


def test_ssh_flash_sends_the_files_then_runs_the_same_install_on_the_device(cpu_bundle, tmp_path):
    from cli.device_install import DeviceSettings
    from cli.flash_commands import FlashOptions, ssh_commands

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    key.write_text("k")
    cert.write_text("c")
    opts = FlashOptions(cpu_bundle, "nvidia@orin.local",
                        DeviceSettings("mqtts://broker.lan", "orin-01", cert_file=str(cert), key_file=str(key)))
    commands = ssh_commands(opts, Path("minicpm_edge-0.1.0-py3-none-any.whl"))
    assert [c[0] for c in commands] == ["ssh", "rsync", "rsync", "rsync", "ssh"]
    assert "--chmod=F600" in commands[3] and str(key) in commands[3]
    remote = shlex.split(commands[-1][-1])[-1]  # sudo sh -c SCRIPT
    steps = remote.split(" && ")
    assert "-m venv --system-site-packages /opt/cpm-edge/.venv" in steps[0] and "/usr/bin/python3" in steps[0]
    flash = shlex.split(steps[3])
    assert flash[:2] == ["/opt/cpm-edge/.venv/bin/cpm-edge", "flash"]
    assert flash[flash.index("--host") + 1] == "local:/"
    assert flash[flash.index("--key-file") + 1] == "/opt/cpm-edge/incoming/secrets/k.pem"
    assert "pycuda" not in remote and steps[-1] == "rm -rf /opt/cpm-edge/incoming"


def test_each_bundle_gets_the_extras_its_runtime_needs():
    from cli.device_install import venv_extras

    assert venv_extras({"backend": "onnxruntime", "trt_flavour": "onnxruntime"}) == "agent,onnxruntime"
    assert venv_extras({"backend": "tensorrt", "trt_flavour": "tensorrt", "jetpack": "6.2"}) == "agent,cuda12"
    assert venv_extras({"backend": "tensorrt", "trt_flavour": "tensorrt", "jetpack": "7.0"}) == "agent,cuda13"
    assert venv_extras({"trt_flavour": "tensorrt-rtx", "jetpack": None}) == "agent,cuda13,tensorrt-rtx"


def test_agent_env_holds_any_password_as_an_environment_file_reads_it(cpu_bundle, tmp_path, capsys):
    from agent.bundle_check import read_manifest
    from cli.device_install import DeviceSettings, env_text, read_env, resolve

    password = "p a$s\\w\"rd #1 `x`"
    secret = tmp_path / "password"
    secret.write_text(password + "\n")
    settings = resolve(DeviceSettings("mqtt://b", "d1", username="agent-d1", password_file=str(secret)),
                       read_manifest(cpu_bundle), {})
    env = tmp_path / "agent.env"
    env.write_text(env_text(settings, {"CPM_ORT_THREADS": "2"}))
    # sh reads single quotes as systemd's EnvironmentFile parser does: nothing inside them is special.
    sh = subprocess.run(["sh", "-c", f'set -a; . {shlex.quote(str(env))}; printf %s "$CPM_EDGE_MQTT_PASSWORD"'],
                        capture_output=True, text=True)
    assert sh.stdout == password and read_env(env.read_text())["CPM_EDGE_MQTT_PASSWORD"] == password
    assert read_env(env.read_text())["CPM_ORT_THREADS"] == "2"  # a key the user added is kept
    secret.write_text("it's\n")
    code, _, err = run_cli(capsys, "flash", "--bundle", cpu_bundle, "--host", f"local:{tmp_path / 'dev'}",
                           "--username", "u", "--password-file", secret)
    assert code == 2 and "CPM_EDGE_MQTT_PASSWORD" in err and "it's" not in err and not (tmp_path / "dev").exists()


def test_gpu_groups_are_only_those_the_device_has(tmp_path):
    from cli.device_install import DeviceSettings, gpu_groups, render_unit

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\n")
    unit = render_unit(DeviceSettings("mqtt://b", "d"), {"backend": "tensorrt"}, groups=gpu_groups(tmp_path))
    assert unit_service(unit)["SupplementaryGroups"] == ["video"]
    assert gpu_groups(tmp_path / "folder-without-etc") == "video render"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the agent must run as a user that cannot write the bundle")
def test_a_gpu_bundle_without_an_engine_goes_to_the_state_folder_not_the_bundle(flashed):
    """A GPU bundle without an engine, as the unit's user: the changed manifest gets the full check (which
    the read-only bundle cannot record), and the agent goes on to the tensorrt backend, whose first-start
    build writes into the unit's state folder (--state-dir) — not the refusal a read-only bundle without a
    state folder gets. Here, without TensorRT or a GPU, that ends in one line and exit 2; the build into a
    state folder itself is tests/test_engine_bundle.py's (TensorRT-RTX)."""
    root, _ = flashed
    manifest = root / "opt" / "cpm-edge" / "bundle" / "manifest.json"
    original, stat = manifest.read_bytes(), manifest.stat()
    raw = json.loads(original)
    manifest.write_text(json.dumps({**raw, "backend": "tensorrt", "trt_flavour": "tensorrt", "engine": None}))
    try:
        agent = UnitProcess(root).start()
        agent.proc.wait(60)
        code, log = agent.stop()
    finally:
        manifest.write_bytes(original)
        os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert code == 2, log
    assert "manifest.json changed since the last full check" in log and "the folder is read-only" in log, log
    assert "no engine yet, and the bundle is read-only here" not in log, log
    assert "an engine bundle needs TensorRT and cuda-python" in log and "Traceback" not in log, log
