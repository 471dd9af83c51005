#!/usr/bin/env python3
"""`make demo`: simulate a drive of the demo vehicle and show its state changing.

Runs from the checkout's .venv. Everything it writes goes to demo-run/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "demo-run"
CONFIG = ROOT / "config" / "demo.yaml"


def main() -> int:
    RUN.mkdir(exist_ok=True)
    capture = RUN / "drive.log"
    agent = [sys.executable, "-m", "agent"]
    subprocess.run(agent + ["simulate", "--config", str(CONFIG), "--duration", "120",
                            "--out", str(capture), "--seed", "7"], check=True, cwd=ROOT)
    decode = subprocess.Popen(agent + ["decode", str(capture), "--config", str(CONFIG)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    start = None
    for line in decode.stdout:
        change = json.loads(line)
        start = change["t"] if start is None else start
        value = "--" if change["value"] is None else change["value"]
        print(f"{change['t'] - start:7.2f}s  {change['signal']:<58} {value!s:>8}  "
              f"{change['quality']}")
    return decode.wait()


if __name__ == "__main__":
    sys.exit(main())
