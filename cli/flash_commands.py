"""`cpm-edge flash` / `cpm-edge bundle verify`: put a bundle and the agent on a device, ready to start.

    HOST=user@jetson.local   rsync the bundle and the kit's wheel to the device, then run the install there
                             (the device needs python3 with venv, and TensorRT from JetPack for GPU bundles)
    HOST=local:ROOT          run the install on this machine with ROOT as the device's `/` (local:/ on the
                             device itself; a folder for tests)

The install itself (layout, venv, unit, agent.env, state folder) is cli/device_install.py. The full sha256
pass happens here, on both sides; each agent start only does the cheap check against the seal it leaves.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import AgentInputError
from cli.device_install import OPT, UNIT_TEMPLATE, VENV, DeviceSettings

KIT_ROOT = Path(__file__).resolve().parents[1]
INCOMING = f"{OPT}/incoming"  # what the ssh flash sends, before the install on the device moves it in place


@dataclass
class FlashOptions:
    bundle: Path
    host: str
    settings: DeviceSettings = field(default_factory=DeviceSettings)
    wheel: Path | None = None        # an already built wheel of the kit (the ssh flash's second half uses it)
    python: str | None = None        # the device python the venv is made from (default /usr/bin/python3)
    unit_template: Path = UNIT_TEMPLATE  # the ssh flash sends the kit's along (the wheel holds no devices/)


PACKAGES = ("agent", "cli", "export", "trt_plugins")


def build_wheel(out: Path) -> Path:
    """The kit as a wheel (no dependencies bundled: the device installs them from its package index), built
    from a clean copy of the sources: setuptools' in-tree build/lib would ship files deleted since."""
    import shutil

    source = out / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(KIT_ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(KIT_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    proc = subprocess.run(base + ["--no-build-isolation"], capture_output=True, text=True)
    if proc.returncode != 0:  # no setuptools in this environment: let pip fetch the build backend
        proc = subprocess.run(base, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AgentInputError(f"building the kit's wheel failed: {proc.stderr.strip().splitlines()[-1:]}")
    return next(out.glob("minicpm_edge-*.whl"))


def flash(opts: FlashOptions, progress=lambda stage: None) -> dict:
    from agent.bundle_check import read_manifest, verify_files
    from cli.device_install import env_text, install, resolve

    manifest = read_manifest(opts.bundle)
    env_text(resolve(opts.settings, manifest, {}), {})  # a bad flag is refused before anything is built or copied
    progress(f"verified {verify_files(opts.bundle, manifest)} files (sha256) before copying")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = opts.wheel
        if wheel is None:
            progress("building the agent wheel")
            wheel = build_wheel(Path(tmp))
        if opts.host.startswith("local:"):
            root = Path(opts.host[len("local:"):] or "/")
            try:
                return install(root, Path(opts.bundle), Path(wheel), opts.settings, opts.python, progress,
                               Path(opts.unit_template))
            except PermissionError as e:
                raise AgentInputError(f"{e.filename}: permission denied; flash to local:{root} as root "
                                      f"(sudo)") from None
        return flash_ssh(opts, Path(wheel), progress)


def remote_flash_command(opts: FlashOptions, wheel_name: str, sent: dict[str, str]) -> str:
    """What runs on the device (as root) once the files are there: a venv with the kit, then the same
    install as `flash --host local:/`. `sent` maps flags to the device paths of the files sent with them."""
    s, python = opts.settings, opts.python or "/usr/bin/python3"
    wheel = f"{INCOMING}/{wheel_name}"
    flags = ["--bundle", f"{INCOMING}/bundle", "--host", "local:/", "--wheel", wheel, "--python", python,
             "--unit-template", f"{INCOMING}/{UNIT_TEMPLATE.name}"]
    for flag, value in (("--broker", s.broker), ("--device-id", s.device_id or None), ("--username", s.username)):
        if value is not None:
            flags += [flag, value]
    for flag, path in sent.items():
        flags += [flag, path]
    if s.keep_onnx:
        flags.append("--keep-onnx")
    return " && ".join([
        f"(test -x {VENV}/bin/python || {shlex.quote(python)} -m venv --system-site-packages {VENV})",
        f"{VENV}/bin/python -m pip install -q --disable-pip-version-check {shlex.quote(wheel + '[agent]')}",
        f"{VENV}/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps {wheel}",
        shlex.join([f"{VENV}/bin/cpm-edge", "flash", *flags]),
        f"rm -rf {INCOMING}",
    ])


def ssh_commands(opts: FlashOptions, wheel: Path) -> list[list[str]]:
    """The commands of an ssh flash, in order (data, so tests can check them without a device)."""
    s = opts.settings
    files = {flag: getattr(s, key) for flag, key in (("--ca-file", "ca_file"), ("--cert-file", "cert_file"),
                                                     ("--key-file", "key_file"), ("--password-file", "password_file"))
             if getattr(s, key) is not None}
    sent = {flag: f"{INCOMING}/secrets/{Path(path).name}" for flag, path in files.items()}
    commands = [
        ["ssh", opts.host, f"sudo mkdir -p {INCOMING}/secrets && sudo chown -R \"$(id -u)\" {INCOMING} && "
                           f"chmod 700 {INCOMING}/secrets"],
        ["rsync", "-a", "--delete", f"{opts.bundle}/", f"{opts.host}:{INCOMING}/bundle/"],
        ["rsync", "-a", str(wheel), str(opts.unit_template), f"{opts.host}:{INCOMING}/"],
    ]
    if files:
        commands.append(["rsync", "-a", "--chmod=F600", *map(str, files.values()), f"{opts.host}:{INCOMING}/secrets/"])
    commands.append(["ssh", opts.host, f"sudo sh -c {shlex.quote(remote_flash_command(opts, wheel.name, sent))}"])
    return commands


def flash_ssh(opts: FlashOptions, wheel: Path, progress) -> dict:
    for cmd in ssh_commands(opts, wheel):
        progress(shlex.join(cmd)[:200])
        proc = subprocess.run(cmd)
        if proc.returncode == 2 and cmd[0] == "ssh":
            raise AgentInputError(f"flash to {opts.host}: the device refused a setting (its line is above); "
                                  f"nothing was started")
        if proc.returncode != 0:
            raise AgentInputError(f"flash to {opts.host} stopped: `{cmd[0]}` exited {proc.returncode} "
                                  f"(the agent already there keeps running; fix the cause and run it again)")
    return {"host": opts.host, "started": True}


def flash_arguments(p: argparse.ArgumentParser):
    p.add_argument("--bundle", required=True, help="bundle folder from cpm-edge engine")
    p.add_argument("--host", required=True, help="user@host (ssh + rsync) or local:ROOT (ROOT is the device's /)")
    p.add_argument("--broker", help="broker URL the agent connects to (default: agent.env's, else "
                                    "mqtt://localhost:1883)")
    p.add_argument("--device-id", default="", help="the agent's device id (default: agent.env's, else the profile)")
    p.add_argument("--ca-file", help="mqtts: the CA of the broker's certificate (installed as /etc/cpm-edge/ca.crt)")
    p.add_argument("--cert-file", help="mqtts: client certificate (installed as /etc/cpm-edge/client.crt)")
    p.add_argument("--key-file", help="mqtts: client key (installed as /etc/cpm-edge/client.key, mode 0600)")
    p.add_argument("--username", help="MQTT user name (written to agent.env)")
    p.add_argument("--password-file", help="file holding the MQTT password (written to agent.env, mode 0600)")
    p.add_argument("--keep-onnx", action="store_true",
                   help="keep model.onnx on the device once its engine is built (default: removed to save space)")
    p.add_argument("--wheel", help="install this wheel of the kit instead of building one")
    p.add_argument("--unit-template", default=str(UNIT_TEMPLATE), help="systemd unit template (default: the kit's "
                                                                      "devices/systemd/cpm-edge-agent.service.in)")
    p.add_argument("--python", help="the device python the venv is made from (default /usr/bin/python3: JetPack's "
                                    "TensorRT is installed for it)")


def flash_command(args) -> int:
    def progress(stage):
        print(f"flash: {stage}", file=sys.stderr, flush=True)

    settings = DeviceSettings(args.broker, args.device_id, args.ca_file, args.cert_file, args.key_file,
                              args.username, args.password_file, args.keep_onnx)
    facts = flash(FlashOptions(Path(args.bundle), args.host, settings, Path(args.wheel) if args.wheel else None,
                               args.python, Path(args.unit_template)), progress)
    extra = f" (venv installed in {facts['venv_seconds']} s)" if "venv_seconds" in facts else ""
    print(f"flashed {args.bundle} to {args.host}{extra}", file=sys.stderr)
    return 0


def bundle_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="check a bundle's manifest and the sha256 of every file (and record it "
                                      "for the agent's cheap start check)")
    v.add_argument("folder", metavar="DIR")


def bundle_command(args) -> int:
    from agent.bundle_check import dropped_files, read_manifest, verify_files, write_seal

    manifest = read_manifest(args.folder)
    dropped = dropped_files(args.folder)
    count = verify_files(args.folder, manifest, dropped)
    sealed = write_seal(args.folder, manifest, dropped)
    print(f"{args.folder}: {count} files match manifest.json ({manifest['device']}, sm_{manifest['sm']}, "
          f"engine: {manifest['engine_status']})"
          + (f"; {', '.join(dropped)} removed on purpose" if dropped else "")
          + ("" if sealed else "; read-only here, so the check was not recorded"), file=sys.stderr)
    return 0


COMMANDS = [("flash", flash_arguments, flash_command, "put a bundle and the agent on a device, install the service"),
            ("bundle", bundle_arguments, bundle_command, "bundle utilities (verify)")]
