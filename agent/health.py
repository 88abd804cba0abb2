"""What the agent reports about itself: memory, tegrastats figures on a Jetson, and systemd notifications."""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import threading
from typing import Optional

log = logging.getLogger("cpm-edge.agent")

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_FREQ = re.compile(r"\b(GR3D_FREQ|EMC_FREQ) (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z0-9_]+)@(-?\d+(?:\.\d+)?)C\b")
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)mW/(\d+)mW")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")


def parse_tegrastats(line: str) -> dict:
    """The figures of one tegrastats line (JetPack 5/6 format); keys absent from the line are left out."""
    out: dict = {}
    if m := _RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m[1]), int(m[2])
    if m := _SWAP.search(line):
        out["swap_used_mb"], out["swap_total_mb"] = int(m[1]), int(m[2])
    for name, pct in _FREQ.findall(line):
        out["gpu_util_pct" if name == "GR3D_FREQ" else "emc_util_pct"] = int(pct)
    temps = {name: float(t) for name, t in _TEMP.findall(line)}
    if temps:
        out["temp_c"] = temps
    power = {name: {"now_mw": int(now), "avg_mw": int(avg)} for name, now, avg in _POWER.findall(line)}
    if power:
        out["power"] = power
    if m := _CPU.search(line):
        loads = [int(c.split("%")[0]) for c in m[1].split(",") if "%" in c]
        if loads:
            out["cpu_util_pct"] = loads
    return out


class Tegrastats:
    """Runs `tegrastats --interval MS` when the binary exists (a Jetson) and keeps its latest line."""

    def __init__(self, interval_ms: int = 1000, binary: Optional[str] = None):
        self.binary = binary or shutil.which("tegrastats")
        self.interval_ms = interval_ms
        self.latest = ""
        self._proc: Optional[subprocess.Popen] = None

    def start(self) -> bool:
        if not self.binary:
            return False
        try:
            self._proc = subprocess.Popen([self.binary, "--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as e:
            log.warning("tegrastats could not start: %s", e)
            return False
        threading.Thread(target=self._read, name="cpm-tegrastats", daemon=True).start()
        return True

    def _read(self):
        for line in self._proc.stdout:
            self.latest = line.strip()

    def figures(self) -> Optional[dict]:
        return parse_tegrastats(self.latest) if self.latest else None

    def stop(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(2)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def memory() -> dict:
    """This process's resident memory and the machine's available memory, in MB (Linux /proc)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(("MemAvailable:", "MemTotal:")):
                    key = "mem_available_mb" if line.startswith("MemAvailable") else "mem_total_mb"
                    out[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def sd_notify(state: str) -> bool:
    """Send READY=1 / WATCHDOG=1 / STOPPING=1 to systemd when run as a Type=notify service; else no-op."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("systemd notify failed: %s", e)
        return False


def watchdog_interval() -> Optional[float]:
    """Half of WatchdogSec when systemd watches this process (WATCHDOG_USEC, WATCHDOG_PID), else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
