#!/usr/bin/env python3
"""`make demo`: the whole chain on this machine, on loopback.

A development PKI, a local mosquitto with mTLS and a per-vehicle ACL, a simulated drive of the
demo vehicle replayed in real time by `car-agent run`, and `car-agent watch` printing every
message after verifying its signature. Everything lives in demo-run/; the broker and the
agent are stopped on exit (Ctrl-C included). DEMO_SECONDS sets the drive's length (default 60).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.dev.broker import DevBroker  # noqa: E402
from agent.dev.pki import init_pki  # noqa: E402

RUN = ROOT / "demo-run"
VEHICLE = "VIN1"


def say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def main() -> int:
    seconds = float(os.environ.get("DEMO_SECONDS", "60"))
    RUN.mkdir(exist_ok=True)
    pki = RUN / "pki"
    init_pki(pki, [VEHICLE])
    say(f"development PKI in {pki.relative_to(ROOT)} (CA, broker, {VEHICLE}, cloud, jwks.json)")

    agent = [sys.executable, "-m", "agent"]
    capture = RUN / "drive.log"
    subprocess.run(agent + ["simulate", "--config", str(ROOT / "config" / "demo.yaml"),
                            "--duration", f"{seconds:g}", "--out", str(capture), "--seed", "7"],
                   check=True, cwd=ROOT)
    outbox = RUN / "outbox.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{outbox}{suffix}").unlink(missing_ok=True)

    children: list[subprocess.Popen] = []
    with DevBroker(pki, RUN / "broker") as broker:
        say(f"mosquitto with mTLS on 127.0.0.1:{broker.port}, ACL vehicles/%u/# "
            "(the cloud identity reads vehicles/#)")
        (RUN / "agent.yaml").write_text(f"""\
vehicle_id: {VEHICLE}
can: {{capture: drive.log, realtime: true}}
dbc: [{ROOT / 'dbc' / 'demo_vehicle.dbc'}]
mapping: {ROOT / 'config' / 'mapping' / 'demo_vehicle.yaml'}
signing: {{key: pki/{VEHICLE}.signing.key}}
mqtt: {{host: 127.0.0.1, port: {broker.port}, ca: pki/ca.crt, cert: pki/{VEHICLE}.crt, key: pki/{VEHICLE}.key}}
store: {{path: outbox.db}}
policy: {{min_interval_s: 5, snapshot_min_interval_s: 5, heartbeat_s: 30}}
""")
        (RUN / "cloud.yaml").write_text(f"""\
mqtt: {{host: 127.0.0.1, port: {broker.port}, ca: pki/ca.crt, cert: pki/cloud.crt, key: pki/cloud.key}}
trust: pki/jwks.json
""")
        try:
            watch = subprocess.Popen(agent + ["watch", "--config", str(RUN / "cloud.yaml")],
                                     cwd=ROOT)
            children.append(watch)
            time.sleep(1.0)
            say(f"car-agent run: replaying a {seconds:g} s simulated drive in real time "
                f"(agent log: {(RUN / 'agent.log').relative_to(ROOT)})")
            with open(RUN / "agent.log", "w") as agent_log:
                run = subprocess.Popen(agent + ["run", "--config", str(RUN / "agent.yaml")],
                                       cwd=ROOT, stderr=agent_log)
                children.append(run)
                code = run.wait()
            time.sleep(1.5)
            last = (RUN / "agent.log").read_text().strip().splitlines()
            say(f"agent exited {code}: {last[-1] if last else ''}")
            return code
        except KeyboardInterrupt:
            say("interrupted; stopping")
            return 130
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                    try:
                        child.wait(10)
                    except subprocess.TimeoutExpired:
                        child.kill()


if __name__ == "__main__":
    sys.exit(main())
