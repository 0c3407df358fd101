"""Run the ``rnnkit`` command in-process for tests."""

from __future__ import annotations

import contextlib
import io

from rnnkit import cli


def run(argv: list[str]) -> tuple[int, str, str]:
    """``rnnkit ARGV`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()
