"""Run kdcli with one function wrapped, so that a test can act inside a phase: `python spy.py MODULE:NAME MARKER ARGS`.

When MODULE.NAME is first called, MARKER is created and the call is held back for a moment, so that a signal
sent by the test as soon as MARKER appears lands inside that phase. With MARKER `raise`, the call raises an
unexpected RuntimeError instead (a stand-in for a kdcli bug). Everything else is the real `kdcli ARGS`."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path


def main() -> int:
    target, marker, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    def spy(*a, **k):
        if str(marker) == "raise":
            raise RuntimeError(f"injected failure in {target}")
        if not marker.exists():
            marker.touch()
            time.sleep(3)  # the test signals now; the signal interrupts this sleep
        return original(*a, **k)

    setattr(module, name, spy)
    from kdcli.cli import main as kdcli

    return kdcli(args)


if __name__ == "__main__":
    sys.exit(main())
