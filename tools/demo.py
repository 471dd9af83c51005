#!/usr/bin/env python3
"""`make demo`: the whole chain on this machine, on loopback.

A development PKI, a local mosquitto with mTLS and a per-vehicle ACL, a simulated drive of the
demo vehicle replayed in real time by `car-agent run`, `car-agent watch` printing every
message after verifying its signature, and `car-agent serve` keeping the verified state. The
demo ends with the owner's view: the answer for VIN1 fetched over serve's HTTP API with the demo
owner's token (`car-agent owner add`), in English and Chinese, and the curl command to ask
again. Everything lives in demo-run/; the broker, serve and the agent are stopped on exit
(Ctrl-C included). DEMO_SECONDS sets the drive's length (default 60).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.dev.broker import DevBroker, free_port  # noqa: E402
from agent.dev.pki import init_pki  # noqa: E402

RUN = ROOT / "demo-run"
VEHICLE = "VIN1"


def say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def ask(url: str, token: str) -> tuple[int, dict]:
    """GET ``url`` with the owner's token: (status, JSON body); (0, {}) if nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


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
    for db in (RUN / "outbox.db", RUN / "state.db"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    owners = RUN / "owners.yaml"
    owners.unlink(missing_ok=True)
    token = subprocess.run([sys.executable, "-m", "agent", "owner", "add", str(owners),
                            "--vehicle", VEHICLE], check=True, cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    say(f"owner of {VEHICLE} added to {owners.relative_to(ROOT)} (only the token's SHA-256 "
        "is stored)")
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"

    children: list[subprocess.Popen] = []
    with DevBroker(pki, RUN / "broker") as broker:
        say(f"mosquitto with mTLS on 127.0.0.1:{broker.port}, ACL: each vehicle publishes "
            "under vehicles/<VIN>/, the cloud identity reads them and alone sends requests")
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
store: {{url: "sqlite:///state.db"}}
http: {{listen: "127.0.0.1:{http_port}"}}
owners: owners.yaml
""")
        try:
            watch = subprocess.Popen(agent + ["watch", "--config", str(RUN / "cloud.yaml")],
                                     cwd=ROOT)
            children.append(watch)
            serve_log = open(RUN / "serve.log", "w")
            serve = subprocess.Popen(agent + ["serve", "--config", str(RUN / "cloud.yaml")],
                                     cwd=ROOT, stderr=serve_log)
            children.append(serve)
            if not wait_until(lambda: serve.poll() is not None or ask(f"{base}/healthz", "")[0],
                              30) or serve.poll() is not None:
                say(f"car-agent serve did not start; see {(RUN / 'serve.log').relative_to(ROOT)}")
                return 1
            say(f"car-agent serve: the owner's API on {base} (log: "
                f"{(RUN / 'serve.log').relative_to(ROOT)})")
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
            stop(watch)     # its lines would run into the answer
            return show_answer(base, token, RUN / "cloud.yaml") if code == 0 else code
        except KeyboardInterrupt:
            say("interrupted; stopping")
            return 130
        finally:
            for child in reversed(children):
                stop(child)


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


def show_answer(base: str, token: str, cloud_config: Path) -> int:
    """The owner's view, last: the answer for VIN1 over HTTP in English and Chinese, and how
    to ask again (serve answers from its store without the broker)."""
    url = f"{base}/v1/vehicles/{VEHICLE}/answer"
    answers: dict[str, dict] = {}

    def answered() -> bool:
        for lang in ("en", "zh"):
            status, body = ask(f"{url}?lang={lang}", token)
            if status != 200:
                return False
            answers[lang] = body
        return True

    if not wait_until(answered, 10):
        say(f"no answer from car-agent serve at {url}; see demo-run/serve.log")
        return 1
    say(f"the owner's answer for {VEHICLE}, from verified data, over the HTTP API:")
    print(f"en: {answers['en']['text']}")
    print(f"zh: {answers['zh']['text']}")
    print(f"ask again: .venv/bin/car-agent serve --config {cloud_config.relative_to(ROOT)} & "
          f"sleep 2; curl -s -H 'Authorization: Bearer {token}' '{url}?lang=en'", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
