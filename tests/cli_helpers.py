"""Run `cpm-edge` in the test process and capture what it says (shared by the CLI tests)."""
from __future__ import annotations

from cli.main import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `cpm-edge ARGV`; argparse's usage errors count as exit statuses."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
