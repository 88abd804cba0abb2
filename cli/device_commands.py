"""`cpm-edge device-test`: on the device, the bundle's golden answers and speed floors through the agent's
own serving path (agent/device_check.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from agent.errors import AgentInputError


def device_test_arguments(p: argparse.ArgumentParser):
    p.add_argument("--bundle", default="/opt/cpm-edge/bundle", help="flashed bundle (default /opt/cpm-edge/bundle)")
    p.add_argument("--report", default="device-report.json", help="where to write the JSON report")
    p.add_argument("--transport", choices=("auto", "mosquitto", "in-process"), default="auto",
                   help="how requests reach the agent's server: a private loopback Mosquitto (auto: when one "
                        "is installed) or in-process")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take (300)")


def device_test_command(args) -> int:
    """Exit 0 when every golden answer and floor holds, 1 when one does not, 2 on bad input."""
    from agent.device_check import run_device_test
    from agent.loopback import mosquitto_binary

    folder = Path(args.bundle)
    if not (folder / "golden.json").exists():
        raise AgentInputError(f"--bundle {folder}: no golden.json (make the bundle with `cpm-edge engine`)")
    if args.transport == "mosquitto" and mosquitto_binary() is None:
        raise AgentInputError("--transport mosquitto: mosquitto is not installed (apt-get install mosquitto), "
                              "or use --transport in-process")
    from agent.client import AgentError

    try:
        report = run_device_test(folder, args.transport, timeout=args.timeout)
    except AgentError as e:  # the server answered an error or nothing: the device does not serve
        print(f"device test FAILED: a request through the agent's server got {e}", file=sys.stderr)
        return 1
    tmp = Path(f"{args.report}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.report)
    print_report(report, args.report)
    return 0 if report["pass"] else 1


def print_report(report: dict, path: str):
    from agent.device_check import LOWER_IS_BETTER

    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    say(f"device test of {report['bundle']} ({report['backend']}) through {report['transport']}")
    for g in report["golden"]:
        detail = "" if g["tokens_match"] else f"; differs in {', '.join(g['mismatches'])}"
        say(f"golden {g['prompt']!r}: {'ok' if g['pass'] else 'FAIL'} (logits cosine {g['logits_cosine']:.5f}{detail})")
    s = report["speed"]
    say(f"speed ({s['prompt_tokens']} prompt tokens, {s['decode_tokens']} new): first token "
        f"{s['time_to_first_token_ms']:.0f} ms, prefill {s['prefill_tokens_per_s']:.0f} tok/s, decode "
        f"{s['decode_tokens_per_s']:.1f} tok/s")
    gpu = report["gpu_memory"]
    if gpu["measured"]:
        say(f"GPU memory ({gpu['source']}, {gpu['scope']}): {gpu['used_by_agent_gb']:.2f} GB used by the agent, "
            f"peak {gpu['peak_gb']:.2f} of {gpu['total_gb']:.2f} GB")
    else:
        say(f"GPU memory: not measured: {gpu['note']}")
    say(f"host memory: peak RSS {report['host_memory']['peak_rss_gb']:.2f} GB")
    for key, f in report["floors"].items():
        shown = "not measured" if f["measured"] is None else f"{f['measured']:.2f}"
        bound = "limit" if key in LOWER_IS_BETTER else "floor"
        say(f"{key}: {shown} ({bound} {f['floor']:.2f}) {'ok' if f['pass'] else 'FAIL'}")
    for key, s in report["floors_below_ceilings"].items():
        if not s["pass"]:
            say(f"{key}: the floor {s['floor']:.2f} is above the hardware's ceiling {s['ceiling']:.2f}: the profile "
                f"is wrong")
    for key, a in report["above_ceilings"].items():
        say(f"note: {key} {a['measured']:.1f} is above the speed model's ceiling {a['ceiling']:.1f}: the profile's "
            f"figures understate this machine (or the weights stay in a CPU cache)")
    if not report["floors"]:
        say("no floors: " + ("its device profile states no memory_bandwidth_gbs (no speed model)"
                             if report["memory_plan"] else "the folder has no plan.json (not made by cpm-edge engine)"))
    say(f"device test {'passed' if report['pass'] else 'FAILED'}; report: {path}")


COMMANDS = [("device-test", device_test_arguments, device_test_command,
             "on the device: golden answers, speed floors and GPU memory through the agent's serving path")]
