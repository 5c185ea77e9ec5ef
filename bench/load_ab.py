"""Side-by-side load runs: start each server in turn on one machine, run bench/load.py against it,
stop it, and print the levels of all servers next to each other.

A server is NAME=ROOT[:ENV=VALUE,...]: the package is imported from ROOT (a checkout, e.g. a
worktree of the commit to compare with), with those environment variables on top of --env. Servers
run one after another, never together, so they do not share the GPU or the CPUs; each gets its own
data directory and port.

    python bench/load_ab.py --model random --levels 32,64,128 --duration 15 --audio-ms 2400 \\
        --server before=.carry/old --server after=. --server gil5=.:CSM_GIL_SWITCH_MS=5 --out-dir out/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402 - bench/load.py, beside this file


@dataclass(frozen=True)
class Server:
    name: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)


def parse_server(spec: str) -> Server:
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--server {spec!r}: expected NAME=ROOT[:ENV=VALUE,...]")
    root, _, env = rest.partition(":")
    pairs = [kv.split("=", 1) for kv in env.split(",") if kv]
    if any(len(kv) != 2 for kv in pairs):
        raise argparse.ArgumentTypeError(f"--server {spec!r}: environment entries are ENV=VALUE")
    return Server(name, Path(root).resolve(), dict(pairs))  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: Server, args: argparse.Namespace, data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.env), **server.env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(server.root), os.environ.get("PYTHONPATH")])),
           "CSM_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "csm_voice_api", "serve", "--model", args.model, "--port", str(port)]
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until stop()
    proc = subprocess.Popen(cmd, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name}: the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"{server.name}: not ready after {args.start_timeout:.0f} s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # drains: open streams finish within the grace period
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_one(server: Server, args: argparse.Namespace, out_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"csm-{server.name}-") as tmp:
        started = time.monotonic()
        proc, url = start(server, args, Path(tmp), out_dir / f"server-{server.name}.log")
        start_s = time.monotonic() - started
        print(f"== {server.name}: ready in {start_s:.0f} s at {url} ({server.root}, {server.env})", flush=True)
        try:
            report = asyncio.run(load.main(load.parse(["--url", url, *load_args(args)])))
        finally:
            stop(proc)
    report.update(server=server.name, root=str(server.root), env=server.env, start_s=round(start_s, 1))
    (out_dir / f"load-{server.name}.json").write_text(json.dumps(report, indent=2))
    return report


def load_args(args: argparse.Namespace) -> list[str]:
    return ["--levels", args.levels, "--mix", str(args.mix), "--duration", str(args.duration),
            "--audio-ms", str(args.audio_ms)]  # fmt: skip


def side_by_side(reports: list[dict]) -> str:
    """One row per level and server: outcomes, TTFA and stall p99, what the server delivered."""
    head = (f"{'clients':>7}  {'server':<12} {'ok':>5} {'rejected':>8} {'errors':>6} {'TTFA p50':>9} {'TTFA p99':>9} "
            f"{'stall p99':>9} {'ws stall':>9} {'http stall':>10} {'rt streams':>10} {'ms/step':>8} {'mimi':>6} "
            f"{'host':>6} {'client lag':>10} {'held':>5}")
    rows = [head]
    levels = sorted({e["clients"] for r in reports for e in r["levels"]})
    for n in levels:
        for r in reports:
            e = next((e for e in r["levels"] if e["clients"] == n), None)
            if e is None:
                continue
            a, srv = e["all"], e.get("server") or {}
            rows.append(
                f"{n:>7}  {r['server']:<12} {a['ok']:>5} {a['rejected']:>8} {sum(a['errors'].values()):>6} "
                f"{_ms(a['ttfa_p50_ms']):>9} {_ms(a['ttfa_p99_ms']):>9} {_ms(a['stall_p99_ms']):>9} "
                f"{_ms(e['ws_sessions']['stall_p99_ms']):>9} {_ms(e['speech_streams']['stall_p99_ms']):>10} "
                f"{srv.get('realtime_streams', '-')!s:>10} {srv.get('ms_per_step', '-')!s:>8} "
                f"{srv.get('codec_ms_per_step', '-')!s:>6} {srv.get('other_ms_per_step', '-')!s:>6} "
                f"{_ms(e.get('client_lag_p99_ms')):>10} {e['held']!s:>5}")
    return "\n".join(rows)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", type=parse_server, action="append", required=True, help="NAME=ROOT[:ENV=VALUE,...]")
    p.add_argument("--env", action="append", default=[], help="ENV=VALUE for every server")
    p.add_argument("--model", default="random", help="--model of each server (random: full size, random weights)")
    p.add_argument("--levels", default="8,32,64,128")
    p.add_argument("--mix", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--audio-ms", type=int, default=2400)
    p.add_argument("--start-timeout", type=float, default=400.0, help="seconds a server may take to be ready")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="skip the servers not started within this many seconds of the run's start (0: none)")
    p.add_argument("--out-dir", type=Path, default=Path("."))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    began, reports = time.monotonic(), []
    for server in args.server:
        if args.deadline and time.monotonic() - began > args.deadline:
            print(f"== {server.name}: skipped (past --deadline {args.deadline:.0f} s)", flush=True)
            continue
        reports.append(run_one(server, args, args.out_dir))
        print("\n" + side_by_side(reports), flush=True)
    return reports


if __name__ == "__main__":
    main()
