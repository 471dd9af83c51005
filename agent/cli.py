"""The ``car-agent`` command line: parses arguments and calls the library. Nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from agent import __version__
from agent.service import logsetup
from agent.errors import UserError

log = logging.getLogger("car_agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="car-agent",
        description="In-car agent: CAN bus -> DBC decoding -> COVESA VSS signals -> signed MQTT 5.",
    )
    parser.add_argument("--version", action="version", version=f"car-agent {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, and tracebacks with errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check-config", help="load config, DBCs and mapping; report problems")
    p.add_argument("--config", required=True, type=Path, help="agent config (YAML)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("decode", help="decode a capture offline: one JSON line per signal change")
    p.add_argument("capture", type=Path, help="candump -L .log, .asc, .blf, .trc (.gz too)")
    p.add_argument("--config", required=True, type=Path,
                   help="agent config (only vehicle_id, dbc and mapping are used)")
    p.add_argument("--format", choices=("candump", "asc", "blf", "trc"),
                   help="capture format (default: from the file extension)")
    p.add_argument("--channel", help="only frames of this channel (default: all channels)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("simulate", help="write a simulated drive as a candump -L capture")
    p.add_argument("--config", required=True, type=Path, help="agent config (YAML)")
    p.add_argument("--duration", required=True, type=_positive_float, metavar="SECONDS")
    p.add_argument("--out", required=True, help="output file (- for stdout)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--bus-load", type=_positive_float, default=2000.0, metavar="FRAMES_PER_S",
                   help="total frames/s including unrelated traffic (default 2000)")
    p.add_argument("--channel", help="channel name written in the capture (default: can.channel "
                                     "of the config, else vcan0)")
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("run", help="the agent: read the bus (or a capture), sign, send over MQTT")
    p.add_argument("--config", required=True, type=Path, help="agent config (YAML)")
    p.add_argument("--drain-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="with a capture source: how long to wait for the outbox to empty "
                        "after the capture ends (default 30)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="play a capture onto a CAN bus (SocketCAN vcan by default)")
    p.add_argument("capture", type=Path, help="candump -L .log, .asc, .blf, .trc (.gz too)")
    p.add_argument("--channel", default="vcan0", help="target channel (default vcan0)")
    p.add_argument("--interface", default="socketcan",
                   help="python-can interface (default socketcan)")
    p.add_argument("--format", choices=("candump", "asc", "blf", "trc"),
                   help="capture format (default: from the file extension)")
    p.add_argument("--speed", type=_positive_float, default=1.0,
                   help="timing scale: 2 plays twice as fast (default 1)")
    p.add_argument("--no-timing", action="store_true",
                   help="send as fast as the bus takes frames")
    p.add_argument("--loop", type=int, default=1, metavar="N", help="play N times (default 1)")
    p.add_argument("--ids", help="only these frame ids, e.g. 0x123,0x2FC")
    p.add_argument("--start", type=float, metavar="S",
                   help="skip the capture's first S seconds")
    p.add_argument("--end", type=float, metavar="S",
                   help="stop at S seconds into the capture")
    p.add_argument("--map", action="append", default=[], metavar="SRC=DST",
                   help="send frames of capture channel SRC to bus channel DST (repeatable); "
                        "with --map, frames of unmapped channels are skipped")
    p.add_argument("--no-fd", action="store_true",
                   help="open the bus without CAN FD (for interfaces that reject fd=True)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    faults = p.add_argument_group("fault injection (for tests)")
    faults.add_argument("--drop", type=float, default=0.0, metavar="FRACTION",
                        help="drop this fraction (0..1) of the frames at random")
    faults.add_argument("--jitter", type=float, default=0.0, metavar="MS",
                        help="move each frame by up to +-MS milliseconds")
    faults.add_argument("--gap", action="append", default=[], metavar="ID:START:DURATION",
                        help="withhold frame id ID from capture second START for DURATION s "
                             "(repeatable)")
    faults.add_argument("--flood", metavar="RATE[:START:DURATION]",
                        help="inject RATE frames/s of random unrelated ids (0x700-0x7EF)")
    faults.add_argument("--seed", type=int, default=1, help="random seed for the faults")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("pki", help="development PKI (NOT for production)")
    pki_sub = p.add_subparsers(dest="pki_command", metavar="SUBCOMMAND", required=True)
    q = pki_sub.add_parser(
        "init", help="DEVELOPMENT ONLY: create a CA, broker, vehicle and cloud certificates, "
                     "signing keys and a JWKS",
        description="DEVELOPMENT ONLY: creates an unprotected CA and keys on local disk. "
                    "Production keys belong in an HSM/TPM-backed PKI.")
    q.add_argument("directory", type=Path)
    q.add_argument("--vehicle", action="append", required=True, metavar="VIN",
                   help="vehicle id (certificate CN); repeat for several")
    q.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    q.set_defaults(func=cmd_pki_init)
    q = pki_sub.add_parser(
        "revoke", help="DEVELOPMENT ONLY: revoke a vehicle's TLS and signing certificates "
                       "(writes DIR/crl.pem)",
        description="DEVELOPMENT ONLY: adds the vehicle's TLS client certificate and its "
                    "signing certificate to DIR/crl.pem, a CRL signed by the unprotected dev "
                    "CA. mosquitto applies it on SIGHUP (crlfile); `car-agent watch` with "
                    "`crl:` in its config on the next message. Renew the CRL before its next "
                    "update: an expired CRL locks every vehicle out.")
    q.add_argument("directory", type=Path)
    q.add_argument("--vehicle", action="append", required=True, metavar="VIN",
                   help="vehicle id to revoke; repeat for several")
    q.add_argument("--reason", default="unspecified",
                   help="CRL reason: unspecified (default), key-compromise, superseded, "
                        "cessation-of-operation, affiliation-changed, ...")
    q.add_argument("--days", type=int, default=30,
                   help="the CRL's next update, in days from now (default 30)")
    q.set_defaults(func=cmd_pki_revoke)

    p = sub.add_parser("watch", help="cloud side: subscribe, verify signatures, print state")
    p.add_argument("--config", required=True, type=Path,
                   help="cloud config (YAML: mqtt {host, port, ca, cert, key}, trust, "
                        "optional crl)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, help="exit after this many verified messages")
    p.add_argument("--duration", type=_positive_float, help="exit after this many seconds")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("status", help="cloud side: how far the car can go and what is open, "
                                      "from verified data (refreshed on request)")
    p.add_argument("vehicle_id", metavar="VEHICLE_ID")
    p.add_argument("--config", required=True, type=Path, help="cloud config (as for watch)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--lang", choices=("en", "zh"), default="en", help="language (default en)")
    p.add_argument("--max-age", type=_non_negative_float, default=300.0, metavar="S",
                   help="ask the car for a snapshot when the state is older (default 300)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("serve", help="cloud side: the owner's service (ingest, store, HTTP API)")
    p.add_argument("--config", required=True, type=Path,
                   help="cloud config (YAML: as for watch, plus store, http, owners, "
                        "mqtt.share_group)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("owner", help="cloud side: owners' tokens for serve")
    owner_sub = p.add_subparsers(dest="owner_command", metavar="SUBCOMMAND", required=True)
    q = owner_sub.add_parser("add", help="create a token for an owner of VID(s); print it "
                                         "(only its SHA-256 is stored)")
    q.add_argument("owners_file", type=Path, metavar="OWNERS_FILE",
                   help="owners file (YAML; created if missing)")
    q.add_argument("--vehicle", action="append", required=True, metavar="VID",
                   help="a vehicle the owner may read; repeat for several")
    q.set_defaults(func=cmd_owner_add)
    return parser


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 or a positive number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.signals.vehicle import load_vehicle

    vehicle = load_vehicle(args.config)
    config = vehicle.config
    decoder = vehicle.decoder()
    for warning in vehicle.database.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    messages = sum(1 for _ in vehicle.database.by_key)
    print(f"{config.file}: OK")
    print(f"  vehicle {config.vehicle_id}; {len(config.dbc)} DBC file(s), {messages} messages")
    print(f"  {len(decoder.paths)} VSS signals from {len(decoder.frame_keys)} frame id(s):")
    for line in decoder.describe():
        print(f"    {line}")
    for note in decoder.notes:
        print(f"  note: {note}")
    if config.can is None:
        print("  source: none (can: missing; `decode` still works)")
    elif config.can.capture is not None:
        print(f"  source: capture {config.can.capture}")
    else:
        print(f"  source: {config.can.interface} {config.can.channel or ''}".rstrip())
    from agent.errors import KeyFileError
    from agent.uplink.keyfiles import check_private_key_file

    keys = [("signing.key", config.signing.key)] if config.signing else []
    keys += [("mqtt.key", config.mqtt.key)] if config.mqtt else []
    for what, path in keys:
        if not path.exists():
            print(f"  {what}: {path} does not exist yet (`run` needs it)")
            continue
        try:
            check_private_key_file(path, what)
        except KeyFileError as exc:
            print(f"warning: `run` will refuse this: {exc}", file=sys.stderr)
    if config.signing:
        from agent.uplink import libcrypto
        print(f"  signing with: {libcrypto.describe()}")
    if config.mqtt is None:
        print("  uplink: none (mqtt: missing; `decode` still works)")
    else:
        print(f"  uplink: mqtts://{config.mqtt.host}:{config.mqtt.port} "
              f"topics {config.mqtt.topic_prefix}/{config.vehicle_id}/...")
        cmd = config.cmd
        print(f"  snapshot requests: {config.mqtt.topic_prefix}/{config.vehicle_id}/cmd/snapshot, "
              f"{cmd.snapshot_rate:g}/s, burst {cmd.snapshot_burst}" if cmd.enabled
              else "  snapshot requests: off (cmd.enabled: false)")
        _check_snapshot_size(config, decoder.paths)
    return 0


def _check_snapshot_size(config, paths: tuple[str, ...]) -> None:
    from agent.uplink.envelope import snapshot_size_bound
    from agent.uplink.mqtt import publish_packet_size

    topic = f"{config.mqtt.topic_prefix}/{config.vehicle_id}/state"
    size = publish_packet_size(topic, b"x" * snapshot_size_bound(paths, config.vehicle_id))
    limit = config.mqtt.max_packet_bytes
    print(f"  full snapshot: up to {size} bytes as an MQTT packet (mqtt.max_packet_bytes {limit})")
    if size > limit:
        print(f"warning: {config.file}: a full snapshot of the {len(paths)} mapped signals can "
              f"reach {size} bytes, more than mqtt.max_packet_bytes ({limit}): such snapshots "
              "would be dropped, never sent; map fewer signals, or raise the limit if the "
              "broker allows it", file=sys.stderr)


def cmd_decode(args: argparse.Namespace) -> int:
    from agent.can.capture import open_capture
    from agent.signals.state import SignalPipeline
    from agent.signals.vehicle import load_vehicle

    vehicle = load_vehicle(args.config)
    pipeline = SignalPipeline(vehicle.decoder())
    out = sys.stdout
    dumps = json.dumps
    changes = 0
    with open_capture(args.capture, args.format, args.channel) as reader:
        for change in pipeline.run_capture(reader):
            out.write(dumps(change.as_dict()) + "\n")
            changes += 1
        out.flush()
        if reader.not_a_capture:
            raise UserError(f"{reader.path}: {reader.error}")
        counters = pipeline.decoder.counters
        error, reader.error = reader.error, None      # reported last, as the command's error
        summary = reader.malformed_summary()
        if summary:
            print(summary, file=sys.stderr)
        # Every frame in one named bucket: the buckets add up to the frame count.
        print(f"{reader.path}: {counters.summary()}"
              + (f"; {reader.other_channel} on other channels" if reader.other_channel else "")
              + f"; {changes} signal changes", file=sys.stderr)
    if error:
        # A capture that could not be read to its end: the output above is incomplete.
        raise UserError(f"{reader.path}: {error}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from agent.dev.simulate import write_capture
    from agent.signals.vehicle import load_vehicle

    vehicle = load_vehicle(args.config)
    target = sys.stdout if args.out == "-" else Path(args.out)
    try:
        frames = write_capture(vehicle, target, args.duration, args.seed, args.bus_load,
                               args.channel)
    except OSError as exc:
        raise UserError(f"{args.out}: cannot write capture: {exc.strerror}") from None
    print(f"simulate: wrote {frames} frames ({args.duration:g} s, "
          f"{frames / args.duration:.0f} frames/s, seed {args.seed}) to {args.out}",
          file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from agent.service.daemon import run

    result = run(args.config, args.drain_timeout, debug=args.debug)
    print(_masked(args, f"car-agent run: {result.message}"), file=sys.stderr)
    return result.exit_code


def cmd_replay(args: argparse.Namespace) -> int:
    import signal as signals

    from agent.dev import replay as rp

    if args.loop < 1:
        raise UserError("--loop: expected 1 or more")
    if not 0.0 <= args.drop <= 1.0:
        raise UserError("--drop: expected a fraction between 0 and 1")
    options = rp.ReplayOptions(
        channel=args.channel, interface=args.interface, speed=args.speed,
        timing=not args.no_timing, loops=args.loop,
        ids=rp.parse_ids(args.ids) if args.ids else None, start=args.start, end=args.end,
        channel_map=rp.parse_map(args.map), capture_format=args.format, fd=not args.no_fd,
        drop=args.drop, jitter_s=args.jitter / 1000.0,
        gaps=tuple(rp.parse_gap(g) for g in args.gap),
        flood=rp.parse_flood(args.flood) if args.flood else None, seed=args.seed)
    stopping = []
    previous = signals.signal(signals.SIGTERM, lambda *_: stopping.append(True))
    progress = None if args.quiet or not sys.stderr.isatty() else rp.terminal_progress()
    try:
        summary = rp.replay(args.capture, options, progress, stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        stopping.append(True)
        summary = None
    finally:
        signals.signal(signals.SIGTERM, previous)
    if progress is not None:
        print(file=sys.stderr)
    if summary is not None:
        print(summary.line(), file=sys.stderr)
    return 130 if stopping else 0


def cmd_pki_init(args: argparse.Namespace) -> int:
    from agent.dev.pki import init_pki

    result = init_pki(args.directory, args.vehicle, days=args.days)
    created = result.get("created", [])
    print(f"pki: {args.directory}: {len(created)} file(s) created "
          f"(DEVELOPMENT ONLY: keys are unprotected files)", file=sys.stderr)
    for path in created:
        print(f"  {path}", file=sys.stderr)
    return 0


def cmd_pki_revoke(args: argparse.Namespace) -> int:
    from agent.dev.pki import revoke

    vins = list(dict.fromkeys(args.vehicle))
    for vin in vins:
        path = revoke(args.directory, vin, args.reason, days=args.days)
    print(f"pki: {path}: revoked {', '.join(vins)} (TLS and signing certificates), next update "
          f"in {args.days} days (DEVELOPMENT ONLY); reload mosquitto (SIGHUP) to apply it",
          file=sys.stderr)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from agent.cloud.watch import watch_main

    return watch_main(args.config, json_lines=args.json, count=args.count,
                      duration=args.duration)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.cloud.status import status_main

    return status_main(args.config, args.vehicle_id, json_out=args.json, lang=args.lang,
                       max_age=args.max_age)


def cmd_serve(args: argparse.Namespace) -> int:
    from agent.cloud.serve import serve_main

    return serve_main(args.config)


def cmd_owner_add(args: argparse.Namespace) -> int:
    from agent.cloud.owners import add_owner

    token = add_owner(args.owners_file, args.vehicle)
    print(token)
    print(f"owner add: {args.owners_file}: a new owner of {', '.join(args.vehicle)}; the token "
          "above is shown once and not stored (only its SHA-256)", file=sys.stderr)
    return 0


def _masked(args: argparse.Namespace, line: str) -> str:
    """``line`` with the vehicle id masked when the config asks for it (``logging.mask_vin``):
    the last line a command prints goes to the same journal as its log lines."""
    config_path = getattr(args, "config", None)
    if config_path is None or args.command == "watch":
        return line
    try:
        from agent.config import load_config

        config = load_config(config_path)
    except Exception:  # noqa: BLE001 - an unreadable config has no vehicle id to hide
        return line
    if not config.logging.mask_vin:
        return line
    return line.replace(config.vehicle_id, logsetup.mask_vin(config.vehicle_id))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.configure(debug=args.debug)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(_masked(args, f"car-agent {args.command}: error: {exc}"), file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `car-agent decode x.log | head`: the reader went away; not an error of ours.
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
