"""`cpm-edge flash` / `cpm-edge bundle verify`. Flash a bundle to a device: copy bundle + agent + systemd unit, verify every sha256 there, install, start.

    HOST=user@jetson.local   over ssh/rsync; the device needs python3, and TensorRT + pycuda from JetPack
    HOST=local:/some/folder  the same layout written into a folder (what the tests use; nothing is started)

Device layout (ROOT is / over ssh, the folder with local:):
    ROOT/opt/cpm-edge/bundle/            the bundle, as made by `cpm-edge engine`
    ROOT/opt/cpm-edge/wheels/            the kit as a wheel (installed into /opt/cpm-edge/.venv with [agent])
    ROOT/etc/systemd/system/cpm-edge-agent.service
    ROOT/etc/cpm-edge/agent.env          broker and device id (mode 0600; kept if it exists)
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentInputError

KIT_ROOT = Path(__file__).resolve().parents[1]
UNIT = KIT_ROOT / "devices" / "jetson" / "cpm-edge-agent.service"
REMOTE_ROOT = "/opt/cpm-edge"


@dataclass
class FlashOptions:
    bundle: Path
    host: str
    broker: str = "mqtt://localhost:1883"
    device_id: str = ""


def build_wheel(out: Path) -> Path:
    """The kit as a wheel (no dependencies bundled: the device installs them from its package index)."""
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(KIT_ROOT)]
    proc = subprocess.run(base + ["--no-build-isolation"], capture_output=True, text=True)
    if proc.returncode != 0:  # no setuptools in this environment: let pip fetch the build backend
        proc = subprocess.run(base, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AgentInputError(f"building the kit's wheel failed: {proc.stderr.strip().splitlines()[-1:]}")
    return next(out.glob("minicpm_edge-*.whl"))


def env_file(opts: FlashOptions, manifest: dict) -> str:
    device_id = opts.device_id or manifest["device"]
    return (f"# cpm-edge agent settings (written by cpm-edge flash); add credentials here, mode 0600\n"
            f"CPM_EDGE_BROKER={opts.broker}\nCPM_EDGE_DEVICE_ID={device_id}\n")


def flash(opts: FlashOptions, progress=lambda stage: None) -> Path | str:
    from agent.bundle_check import read_manifest, verify_files

    manifest = read_manifest(opts.bundle)
    verify_files(opts.bundle, manifest)  # never ship a bundle that is already damaged
    with tempfile.TemporaryDirectory() as tmp:
        progress("building the agent wheel")
        wheel = build_wheel(Path(tmp))
        if opts.host.startswith("local:"):
            return flash_local(opts, manifest, wheel, Path(opts.host[len("local:"):]), progress)
        return flash_ssh(opts, manifest, wheel, progress)


def flash_local(opts: FlashOptions, manifest: dict, wheel: Path, root: Path, progress) -> Path:
    """Write the device layout under root and verify the copy as the device would."""
    from agent.bundle_check import read_manifest, verify_files

    opt = root / REMOTE_ROOT.lstrip("/")
    progress(f"copying the bundle to {opt / 'bundle'}")
    staging = opt / ".bundle.incoming"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(opts.bundle, staging)
    progress(f"verifying {verify_files(staging, read_manifest(staging))} files on the device side (sha256)")
    shutil.rmtree(opt / "bundle", ignore_errors=True)
    staging.rename(opt / "bundle")
    (opt / "wheels").mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, opt / "wheels" / wheel.name)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    shutil.copy2(UNIT, units / UNIT.name)
    settings = root / "etc" / "cpm-edge" / "agent.env"
    settings.parent.mkdir(parents=True, exist_ok=True)
    if not settings.exists():
        settings.write_text(env_file(opts, manifest))
        settings.chmod(0o600)
    progress(f"installed into {root} (a folder: no service is started; on a device the unit is enabled)")
    return root


def ssh_commands(opts: FlashOptions, manifest: dict, wheel_name: str) -> list[list[str]]:
    """The commands that install and start the agent over ssh (after rsync has copied the files)."""
    r = REMOTE_ROOT
    script = " && ".join([
        f"python3 -m venv --system-site-packages {r}/.venv",  # JetPack's tensorrt and pycuda stay visible
        f"{r}/.venv/bin/pip install -q '{r}/wheels/{wheel_name}[agent,onnxruntime]'",
        f"{r}/.venv/bin/cpm-edge bundle verify {r}/bundle.incoming",
        f"rm -rf {r}/bundle && mv {r}/bundle.incoming {r}/bundle",
        *([f"{r}/.venv/bin/cpm-edge engine build --bundle {r}/bundle"] if not manifest.get("engine") else []),
        f"id cpm-edge >/dev/null 2>&1 || useradd --system --groups video cpm-edge",
        f"install -m 0644 {r}/{UNIT.name} /etc/systemd/system/{UNIT.name}",
        f"mkdir -p /etc/cpm-edge && (test -f /etc/cpm-edge/agent.env || "
        f"(printf %s {shlex.quote(env_file(opts, manifest))} > /etc/cpm-edge/agent.env && "
        f"chmod 600 /etc/cpm-edge/agent.env))",
        "systemctl daemon-reload", f"systemctl enable --now {UNIT.stem}", f"systemctl restart {UNIT.stem}",
    ])
    return [
        ["ssh", opts.host, f"sudo mkdir -p {r}/wheels && sudo chown -R $(id -u) {r}"],
        ["rsync", "-a", "--delete", f"{opts.bundle}/", f"{opts.host}:{r}/bundle.incoming/"],
        ["rsync", "-a", str(UNIT), f"{opts.host}:{r}/{UNIT.name}"],
        ["ssh", opts.host, f"sudo sh -c {shlex.quote(script)}"],
    ]


def flash_ssh(opts: FlashOptions, manifest: dict, wheel: Path, progress) -> str:
    run = [["rsync", "-a", str(wheel), f"{opts.host}:{REMOTE_ROOT}/wheels/"]]
    commands = ssh_commands(opts, manifest, wheel.name)
    for cmd in commands[:1] + run + commands[1:]:
        progress(" ".join(shlex.quote(c) for c in cmd)[:160])
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise AgentInputError(f"flash to {opts.host} stopped: `{cmd[0]}` exited {proc.returncode} "
                                  f"(nothing was started; fix the cause and run it again)")
    return opts.host


def flash_arguments(p: argparse.ArgumentParser):
    p.add_argument("--bundle", required=True, help="bundle folder from cpm-edge engine")
    p.add_argument("--host", required=True, help="user@host (ssh + rsync) or local:/folder")
    p.add_argument("--broker", default="mqtt://localhost:1883", help="broker URL the agent connects to")
    p.add_argument("--device-id", default="", help="the agent's device id (default: the profile name)")


def flash_command(args) -> int:
    def progress(stage):
        print(f"flash: {stage}", file=sys.stderr, flush=True)

    where = flash(FlashOptions(Path(args.bundle), args.host, args.broker, args.device_id), progress)
    print(f"flashed {args.bundle} to {where}", file=sys.stderr)
    return 0


def bundle_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="check a bundle's manifest and the sha256 of every file")
    v.add_argument("folder", metavar="DIR")


def bundle_command(args) -> int:
    from agent.bundle_check import read_manifest, verify_files

    manifest = read_manifest(args.folder)
    count = verify_files(args.folder, manifest)
    print(f"{args.folder}: {count} files match manifest.json ({manifest['device']}, sm_{manifest['sm']}, "
          f"engine: {manifest['engine_status']})", file=sys.stderr)
    return 0


COMMANDS = [("flash", flash_arguments, flash_command, "copy a bundle + agent to a device, verify, install"),
            ("bundle", bundle_arguments, bundle_command, "bundle utilities (verify)")]


def device_test_arguments(p: argparse.ArgumentParser):
    p.add_argument("--bundle", default="/opt/cpm-edge/bundle", help="flashed bundle (default /opt/cpm-edge/bundle)")
    p.add_argument("--report", default="device-report.json", help="where to write the JSON report")


def device_test_command(args) -> int:
    """Golden cases and speed floors on this device; exit 0 when all hold, 1 when one does not."""
    import json
    import os

    import yaml

    from agent.backends import open_bundle
    from agent.device_check import run_checks

    backend, _, info = open_bundle(args.bundle, max_batch=1)
    floors = (yaml.safe_load((Path(args.bundle) / "profile.yaml").read_text()) or {}).get("floors", {})
    report = {"bundle": str(args.bundle), "device": info.get("device"), "backend": info["backend"],
              **run_checks(backend, Path(args.bundle), floors, info.get("vocab_size", 1000))}
    tmp = Path(f"{args.report}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.report)
    for g in report["golden"]:
        print(f"golden {g['prompt']!r}: {'ok' if g['pass'] else 'FAIL'} (cosine {g['logits_cosine']:.5f})",
              file=sys.stderr)
    for key, f in report["floors"].items():
        print(f"{key}: {f['measured']:.1f} (floor {f['floor']}) {'ok' if f['pass'] else 'FAIL'}", file=sys.stderr)
    print(f"device test {'passed' if report['pass'] else 'FAILED'}; report: {args.report}", file=sys.stderr)
    return 0 if report["pass"] else 1


COMMANDS.append(("device-test", device_test_arguments, device_test_command,
                 "on the device: golden cases and speed floors of a flashed bundle"))
