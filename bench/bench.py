"""Load benchmark: the sidecar against nginx and Caddy doing the same job, on 127.0.0.1 only.

Started by ``bash bench/run.sh`` (which installs missing tools). Targets, all in front of one
nginx upstream that answers every request with the same 1 KiB body:

* ``direct``: the upstream itself (the ceiling wrk can reach on this machine);
* ``nginx proxy``: nginx ``proxy_pass`` with a keep-alive upstream pool, one worker;
* ``caddy``: Caddy ``reverse_proxy``, ``GOMAXPROCS=1``;
* ``sidecar 10 rules`` / ``sidecar 100k rules``: the sidecar (``workers: 1``) with 10 and with
  100,000 denylist CIDRs (mixed IPv4/IPv6, deterministic, none matching 127.0.0.1).

wrk runs round-robin across the targets (the start rotates each round) so drift is shared; the
table shows medians across rounds. CPU per request is the server process tree's utime+stime
(``/proc/<pid>/stat``) over one wrk run divided by the requests wrk completed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import ipaddress
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
BODY = b"sidecar-bench-1k" * 64  # 1024 bytes, nothing nginx would need escaped
assert len(BODY) == 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
RULE_SEED = 20240611
LOOPBACK = ipaddress.ip_address("127.0.0.1")
OTHER_LOAD_WARN = 0.25  # cores used by foreign processes during a run before the report warns


class BenchError(Exception):
    """A failure with a message meant for the operator (no traceback needed)."""


class Interrupted(Exception):
    """A signal or the wall-clock budget: stops everything (not one target's failure)."""


# --- processes -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if this script dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.started_at = time.monotonic()
            self.popen = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # own process group: stop() reaches nginx's workers
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = text.splitlines()[-lines:]
        return "\n".join(tail) if tail else "(empty)"

    def stop(self) -> None:
        proc = self.popen
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # the group this script created for it
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Anything left in the group (a worker that outlived its master) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(port: int, path: str = "/", timeout: float = 3.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http_ok(server: Server, port: int, path: str, timeout: float) -> float:
    """Poll until ``path`` answers 200; seconds since the process was started."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not server.alive():
            code = server.popen.returncode if server.popen else None
            raise BenchError(
                f"{server.name} exited with status {code} before {path} answered 200; "
                f"its output ({server.log_path}):\n{server.log_tail()}"
            )
        try:
            status, _ = http_get(port, path, timeout=2.0)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200:
                return time.monotonic() - server.started_at
            last = f"HTTP {status}"
        time.sleep(0.02)
    raise BenchError(
        f"{server.name}: http://127.0.0.1:{port}{path} did not answer 200 within {timeout:.0f} s "
        f"(last: {last}); its output:\n{server.log_tail()}"
    )


def check_body(name: str, port: int, server: Server | None) -> None:
    try:
        status, body = http_get(port, "/", timeout=5.0)
    except OSError as exc:
        raise BenchError(f"{name}: GET / failed: {exc}") from exc
    if status != 200 or body != BODY:
        tail = f"\nits output:\n{server.log_tail()}" if server else ""
        raise BenchError(
            f"{name}: GET / answered {status} with {len(body)} bytes {body[:200]!r}, "
            f"expected 200 with the 1 KiB body{tail}"
        )


# --- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


@dataclass
class CpuSnapshot:
    """CPU seconds used so far: per live process (utime+stime, all threads), by the whole
    machine (busy time in /proc/stat), by this script and by its waited-for children (wrk)."""

    wall: float
    machine: float
    own: float
    procs: dict[int, tuple[int, float]]  # pid -> (ppid, seconds)

    @classmethod
    def take(cls) -> CpuSnapshot:
        procs: dict[int, tuple[int, float]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat_fields(int(entry.name))
                if fields is not None:
                    # ppid is field 4 of stat(5), utime and stime fields 14 and 15
                    ticks = int(fields[11]) + int(fields[12])
                    procs[int(entry.name)] = (int(fields[1]), ticks / CLK_TCK)
        with open("/proc/stat") as stat:
            jiffies = [int(v) for v in stat.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user). irq and
        # softirq are left out: loopback traffic is mostly softirq, charged to no process.
        busy = sum(jiffies[:3]) + jiffies[7]
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            own += usage.ru_utime + usage.ru_stime
        return cls(time.monotonic(), busy / CLK_TCK, own, procs)

    def tree(self, root: int) -> float:
        """CPU seconds of ``root`` and its descendants."""
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in self.procs.items():
            children.setdefault(ppid, []).append(pid)
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            total += self.procs.get(pid, (0, 0.0))[1]
            todo.extend(children.get(pid, []))
        return total


def cpu_seconds(root: int) -> float:
    """utime+stime of ``root`` and its live descendants (all threads), in seconds."""
    return CpuSnapshot.take().tree(root)


def other_load(before: CpuSnapshot, after: CpuSnapshot, roots: Sequence[int]) -> float:
    """Average cores busy with processes this benchmark did not start, between two snapshots."""
    ours = sum(after.tree(r) - before.tree(r) for r in roots) + (after.own - before.own)
    wall = after.wall - before.wall
    return max(0.0, (after.machine - before.machine) - ours) / wall if wall > 0 else 0.0


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def summarize_log(path: Path) -> list[tuple[int, str, str]]:
    """Group a server's output lines: (count, one-line description, first full example).
    JSON log records group by level, message and the exception's last line plus the innermost
    frame in the sidecar package; other lines group by their text."""
    groups: dict[str, tuple[int, str]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise TypeError
        except (ValueError, TypeError):
            key, example = line[:300], line
        else:
            key = f'{record.get("level", "?")} "{record.get("msg", "")}"'
            exc = str(record.get("exc") or "").strip()
            if exc:
                frames = re.findall(r'File "[^"]*/(sidecar/[^"]+)", line (\d+), in (\S+)', exc)
                where = f" at {frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]}" if frames else ""
                key += f" ({exc.splitlines()[-1]}{where})"
            example = exc or line
        count, first = groups.get(key, (0, example))
        groups[key] = (count + 1, first)
    return sorted(((n, k, ex) for k, (n, ex) in groups.items()), reverse=True)


# --- configs ---------------------------------------------------------------------------------


def nginx_conf(tmp: Path, name: str, port: int, location: str, http_extra: str = "") -> Path:
    conf = f"""\
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
{http_extra}
    server {{
        listen 127.0.0.1:{port};
        location / {{
{location}
        }}
    }}
}}
"""
    path = tmp / f"{name}.conf"
    path.write_text(conf)
    return path


def nginx_server(tmp: Path, name: str, conf: Path) -> Server:
    cmd = ["nginx", "-p", f"{tmp}/", "-e", f"{tmp}/{name}-error.log", "-c", str(conf)]
    return Server(name, cmd, tmp / f"{name}.out")


def caddy_server(tmp: Path, port: int, upstream: int) -> Server:
    caddyfile = tmp / "Caddyfile"
    caddyfile.write_text(
        "{\n"
        "\tadmin off\n"
        "\tauto_https off\n"
        "\tlog {\n\t\toutput discard\n\t}\n"
        "}\n\n"
        f"http://127.0.0.1:{port} {{\n"
        f"\treverse_proxy 127.0.0.1:{upstream}\n"
        "}\n"
    )
    env = dict(os.environ)
    env.update(
        GOMAXPROCS="1",
        HOME=str(tmp),
        XDG_DATA_HOME=str(tmp / "caddy-data"),
        XDG_CONFIG_HOME=str(tmp / "caddy-config"),
    )
    cmd = ["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
    return Server("caddy", cmd, tmp / "caddy.out", env=env)


def make_rules(count: int, seed: int = RULE_SEED) -> list[str]:
    """``count`` distinct CIDRs, ~60% IPv4 (mostly /32 and /24) and ~40% global IPv6, none
    containing 127.0.0.1. The first n of a longer list equal ``make_rules(n)``."""
    rng = random.Random(seed)
    v4_lengths = [32] * 6 + [24] * 3 + list(range(8, 32))
    v6_lengths = [128] * 4 + [64] * 4 + [48] * 2 + list(range(16, 129, 4))
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        net: ipaddress.IPv4Network | ipaddress.IPv6Network
        if rng.random() < 0.6:
            net = ipaddress.IPv4Network((rng.getrandbits(32), rng.choice(v4_lengths)), strict=False)
            if LOOPBACK in net:
                continue
        else:
            addr = (1 << 125) | rng.getrandbits(125)  # 2000::/3, global unicast
            net = ipaddress.IPv6Network((addr, rng.choice(v6_lengths)), strict=False)
        text = str(net)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def sidecar_config(
    tmp: Path,
    name: str,
    port: int,
    admin: int,
    upstream: int,
    rules: list[str],
    key: str,
    workers: int = 1,
) -> Path:
    lines = [
        f"listen: {{host: 127.0.0.1, port: {port}, drain_timeout: 1}}",
        f"admin: {{host: 127.0.0.1, port: {admin}}}",
        f"workers: {workers}",
        f'upstream: {{url: "http://127.0.0.1:{upstream}"}}',
        "security:",
        "  ip_allowlist: []",
        "  ip_denylist:",
        *(f'    - "{rule}"' for rule in rules),
        "mfa:",
        "  rp_id: localhost",
        f'  origin: "http://localhost:{port}"',
        f'  session: {{secret_keys: ["{key}"], secure: false}}',
        f'storage: {{url: "sqlite:///{tmp}/{name}.db", encryption_key: "{key}"}}',
        "logging: {level: warning, format: json}",
    ]
    path = tmp / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fernet_key() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "keys", "generate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    key = proc.stdout.strip()
    if proc.returncode != 0 or not key:
        raise BenchError(
            f"`sidecar keys generate` failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return key


def sidecar_metrics(admin_port: int) -> dict[str, float]:
    """Samples of interest from the admin /metrics page (empty if it cannot be read)."""
    try:
        status, body = http_get(admin_port, "/metrics", timeout=5.0)
    except OSError:
        return {}
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(("sidecar_ip_rules{", "sidecar_requests_total{")):
            sample, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[sample] = float(value)
    return out


# --- wrk -------------------------------------------------------------------------------------

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS_US[match.group(2)]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_us: float
    p99_us: float
    errors: int  # socket errors + non-2xx/3xx
    cpu_us_per_req: float | None = None
    other_cores: float | None = None  # load from processes outside the benchmark


def parse_wrk(out: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ", out, re.M)
    p50 = re.search(r"^\s*50(?:\.0+)?%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s*99(?:\.0+)?%\s+(\S+)", out, re.M)
    if not (rps and total and p50 and p99):
        raise ValueError("wrk output lacks Requests/sec, request count or latency percentiles")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        p50_us=_duration_us(p50.group(1)),
        p99_us=_duration_us(p99.group(1)),
        errors=errors,
    )


def run_wrk(port: int, args: argparse.Namespace, duration: float) -> tuple[WrkResult, str]:
    cmd = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration:g}s",
        "--timeout",
        "5s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 20, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {duration + 20:.0f} s: {cmd}") from exc
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}")
    try:
        return parse_wrk(proc.stdout), proc.stdout
    except ValueError as exc:
        raise BenchError(f"{exc}; wrk said:\n{proc.stdout}\n{proc.stderr}") from exc


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    server: Server
    is_sidecar: bool = False
    admin_port: int | None = None
    rules: int = 0
    runs: list[WrkResult] = field(default_factory=list)
    failure: str | None = None
    startup_s: float | None = None
    idle_rss_kib: int | None = None
    peak_rss_kib: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    log_summary: list[tuple[int, str, str]] = field(default_factory=list)
    workers: int = 1


def machine_info() -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(cmd: list[str]) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (proc.stdout + proc.stderr).strip().splitlines()
        return text[0] if text else "?"

    try:
        import aiohttp

        aiohttp_version = aiohttp.__version__
    except ImportError:
        aiohttp_version = "not importable"
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio default loop (uvloop not installed)"
    return [
        f"- nproc: {os.cpu_count()}, CPU: {model}",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- python: {platform.python_version()} ({sys.executable}), aiohttp {aiohttp_version}, "
        f"{loop}",
        f"- {version(['nginx', '-v'])}; caddy {version(['caddy', 'version'])}; "
        f"{version(['wrk', '-v']).split(' [')[0]}",
    ]


def fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} ms"
    return f"{value:.0f} µs"


def median_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _label(sample: str, name: str) -> str:
    """``'m{decision="allowed"}'`` -> ``'allowed'``."""
    match = re.search(name + r'="([^"]*)"', sample)
    return match.group(1) if match else sample


def report(targets: list[Target], args: argparse.Namespace, info: list[str], elapsed: float) -> str:
    by_name = {t.name: t for t in targets}

    def med_rps(t: Target | None) -> float | None:
        return median_of([r.rps for r in t.runs]) if t and t.runs else None

    direct = med_rps(by_name.get("direct"))
    nginx = med_rps(by_name.get("nginx proxy"))
    rounds = "1 round" if args.rounds == 1 else f"{args.rounds} rounds"
    out = [
        "# Sidecar load benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, `wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration:g}s --latency`, {rounds} round-robin over the targets, medians "
        f"shown; GET / with a 1 KiB body from an nginx upstream; all on 127.0.0.1.",
        "",
        *info,
        "",
        "| target | requests/s | p50 | p99 | server CPU µs/request | vs direct | vs nginx proxy "
        "| errors | req/s per round | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for t in targets:
        rps = med_rps(t)
        if rps is None:
            out.append(f"| {t.name} | FAILED | | | | | | | {t.failure or ''} | |")
            continue
        cpu = median_of([r.cpu_us_per_req for r in t.runs])
        vs_direct = f"{rps / direct:.3f}" if direct else "-"
        vs_nginx = f"{rps / nginx:.3f}" if nginx else "-"
        per_round = ", ".join(f"{r.rps:,.0f}" for r in t.runs)
        if t.failure:
            per_round += f" (then failed: {t.failure})"
        out.append(
            f"| {t.name} | {rps:,.0f} | {fmt_us(median_of([r.p50_us for r in t.runs]))} "
            f"| {fmt_us(median_of([r.p99_us for r in t.runs]))} "
            f"| {'-' if cpu is None else f'{cpu:.1f}'} | {vs_direct} | {vs_nginx} "
            f"| {sum(r.errors for r in t.runs)} | {per_round} "
            f"| {max(r.other_cores or 0.0 for r in t.runs):.2f} |"
        )
    busiest = max((r.other_cores or 0.0 for t in targets for r in t.runs), default=0.0)
    if busiest > OTHER_LOAD_WARN:
        out += [
            "",
            f"**WARNING: the machine was not idle**: processes outside this benchmark used up to "
            f"{busiest:.2f} of {os.cpu_count()} cores during a run (column `other load`, the "
            "worst run per target); those numbers are depressed. Re-run on a quiet machine.",
        ]
    small = next((t for t in targets if t.is_sidecar and t.rules <= 1000 and t.workers == 1), None)
    big = next((t for t in targets if t.is_sidecar and t.rules > 1000), None)
    multi = next((t for t in targets if t.is_sidecar and t.workers > 1), None)
    small_rps, big_rps = med_rps(small), med_rps(big)
    out.append("")
    if small and big and small_rps and big_rps:
        out.append(
            f"{big.rules // 1000}k-rule sidecar throughput = {100 * big_rps / small_rps:.1f}% "
            f"of the {small.rules}-rule sidecar"
        )
    else:
        out.append("100k-rule sidecar throughput: not measured (a sidecar failed)")
    multi_rps = med_rps(multi)
    if multi and small and multi_rps and small_rps:
        out.append(
            f"\n{multi.workers}-worker sidecar throughput = {multi_rps / small_rps:.2f}x the "
            "1-worker sidecar (wrk and the upstream share the same 2 cores)"
        )
    out += [
        "",
        "Server CPU is the target's own process tree (utime+stime from /proc/<pid>/stat over "
        "each wrk run / requests completed): for `direct` that is the upstream nginx, for the "
        "proxies the proxy alone (the upstream and wrk are not counted). Other load: machine "
        "busy time (/proc/stat) minus this benchmark's processes, per second of the run.",
        "",
        "| sidecar | denylist rules (configured / loaded) | start-up until /healthz 200 "
        "| RSS after start | peak RSS (VmHWM) | decisions (metrics) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for t in targets:
        if not t.is_sidecar:
            continue
        loaded = t.metrics.get('sidecar_ip_rules{list="denylist"}')
        decisions = ", ".join(
            f"{_label(k, 'decision')}: {v:,.0f}"
            for k, v in sorted(t.metrics.items())
            if k.startswith("sidecar_requests_total{") and v
        )

        def mib(kib: int | None) -> str:
            return "-" if kib is None else f"{kib / 1024:.1f} MiB"

        out.append(
            f"| {t.name} | {t.rules:,} / {'?' if loaded is None else f'{loaded:,.0f}'} "
            f"| {'-' if t.startup_s is None else f'{t.startup_s:.2f} s'} "
            f"| {mib(t.idle_rss_kib)} | {mib(t.peak_rss_kib)} | {decisions or '-'} |"
        )
    out += ["", "Sidecar output during the run (stdout/stderr, `logging.level: warning`):", ""]
    for t in targets:
        if t.is_sidecar:
            if not t.log_summary:
                out.append(f"- {t.name}: nothing")
            for count, desc, _ in t.log_summary[:8]:
                out.append(f"- {t.name}: {count:,}x {desc}")
    out += ["", f"Total wall time {elapsed:.0f} s."]
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s per target")
    parser.add_argument("--rounds", type=int, help="rounds over all targets (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded wrk s per target")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rules", type=int, default=100_000, help="rules of the big sidecar")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for other processes to use under "
        f"{OTHER_LOAD_WARN} cores (default 0: just measure and report it)",
    )
    parser.add_argument("--budget", type=float, help="hard wall-clock limit in seconds")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.budget is None:
        # Generous over the expected time (start-up + warm-up + rounds), still bounded.
        expected = 60 + 5 * (args.warmup + 1) + 5 * args.rounds * (args.duration + 1.5)
        args.budget = expected * 1.5 + max(args.wait_idle, 0.0)
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1 or args.threads < 1:
        parser.error("rounds, duration, connections and threads must be positive")
    if args.rules <= 1000:
        parser.error("--rules must be over 1000 (the small sidecar has 10)")
    return args


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def arm(budget: float) -> None:
    """Turn SIGTERM/SIGHUP/SIGINT and the wall-clock budget into exceptions, so that the
    finally blocks stopping the servers always run."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGALRM:
            raise Interrupted(f"over the wall-clock budget of {budget:.0f} s (--budget)")
        raise Interrupted(f"interrupted by signal {signal.Signals(signum).name}")

    for sig in (*_STOP_SIGNALS, signal.SIGALRM):
        signal.signal(sig, on_signal)
    signal.setitimer(signal.ITIMER_REAL, budget)


def shield() -> None:
    """From here on (cleanup), signals and the budget no longer interrupt anything."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def wait_for_quiet(limit: float, quiet_for: int = 3) -> float:
    """Other processes' load (cores), sampled over one second. With ``limit`` > 0, keep
    sampling for up to that many seconds until ``quiet_for`` samples in a row stay under
    OTHER_LOAD_WARN. Returns the highest of the last ``quiet_for`` samples."""
    deadline = time.monotonic() + limit
    recent: list[float] = []
    while True:
        before = CpuSnapshot.take()
        time.sleep(1.0)
        recent = [*recent, other_load(before, CpuSnapshot.take(), [])][-quiet_for:]
        if limit <= 0 or time.monotonic() >= deadline:
            return max(recent)
        if len(recent) == quiet_for and max(recent) <= OTHER_LOAD_WARN:
            return max(recent)
        print(
            f"waiting for a quiet machine: other processes busy {recent[-1]:.2f} cores", flush=True
        )


def bench(args: argparse.Namespace, tmp: Path, servers: list[Server]) -> int:
    t0 = time.monotonic()
    busy = wait_for_quiet(args.wait_idle)
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info = [
        *machine_info(),
        f"- before the run: other processes busy {busy:.2f} cores, load average {loadavg}",
    ]
    print("\n".join(info), flush=True)

    def start(server: Server) -> Server:
        servers.append(server)
        server.start()
        return server

    up_port, ngx_port, caddy_port = free_port(), free_port(), free_port()
    upstream = start(
        nginx_server(
            tmp,
            "upstream",
            nginx_conf(
                tmp,
                "upstream",
                up_port,
                f'            default_type text/plain;\n            return 200 "{BODY.decode()}";',
            ),
        )
    )
    wait_http_ok(upstream, up_port, "/", 15)
    proxy = start(
        nginx_server(
            tmp,
            "nginx-proxy",
            nginx_conf(
                tmp,
                "nginx-proxy",
                ngx_port,
                "            proxy_pass http://backend;\n"
                "            proxy_http_version 1.1;\n"
                '            proxy_set_header Connection "";',
                f"    upstream backend {{\n        server 127.0.0.1:{up_port};\n"
                "        keepalive 64;\n    }",
            ),
        )
    )
    caddy = start(caddy_server(tmp, caddy_port, up_port))
    wait_http_ok(proxy, ngx_port, "/", 15)
    wait_http_ok(caddy, caddy_port, "/", 30)

    targets = [
        Target("direct", up_port, upstream),
        Target("nginx proxy", ngx_port, proxy),
        Target("caddy", caddy_port, caddy),
    ]
    key = fernet_key()
    print(f"generating {args.rules:,} denylist rules ...", flush=True)
    all_rules = make_rules(max(args.rules, 10))
    for count, workers in ((10, 1), (args.rules, 1), (10, 2)):
        label = f"{count // 1000}k" if count >= 1000 and count % 1000 == 0 else f"{count:,}"
        name = f"sidecar {label} rules" + (f", {workers} workers" if workers > 1 else "")
        slug = f"sidecar-{count}" + (f"-w{workers}" if workers > 1 else "")
        port, admin = free_port(), free_port()
        conf = sidecar_config(
            tmp, slug, port, admin, up_port, all_rules[:count], key, workers=workers
        )
        cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(conf)]
        server = start(Server(name, cmd, tmp / f"{slug}.out"))
        # One at a time, nothing else busy: start-up is timed from spawn to /healthz 200.
        startup = wait_http_ok(server, admin, "/healthz", 120)
        target = Target(name, port, server, True, admin, count, startup_s=startup)
        target.workers = workers
        target.idle_rss_kib = proc_status_kib(server.pid, "VmRSS")
        target.metrics = sidecar_metrics(admin)
        print(f"{name}: up in {startup:.2f} s", flush=True)
        targets.append(target)

    for t in targets:
        check_body(t.name, t.port, t.server)
    print("all targets answer 200 with the 1 KiB body", flush=True)

    def measure(t: Target, duration: float) -> WrkResult | None:
        if t.failure:
            return None
        roots = [s.pid for s in servers if s.alive()]
        try:
            before = CpuSnapshot.take()
            result, _ = run_wrk(t.port, args, duration)
            after = CpuSnapshot.take()
        except BenchError as exc:
            t.failure = str(exc)
        else:
            result.other_cores = other_load(before, after, roots)
            if result.requests:
                cpu = after.tree(t.server.pid) - before.tree(t.server.pid)
                result.cpu_us_per_req = cpu * 1e6 / result.requests
            if not t.server.alive():
                t.failure = f"process exited ({t.server.popen and t.server.popen.returncode})"
            elif result.requests == 0:
                t.failure = "no request completed"
            else:
                return result
        print(f"  {t.name}: FAILED: {t.failure}\n{t.server.log_tail()}", flush=True)
        return None

    if args.warmup > 0:
        print(f"warm-up: {args.warmup:g} s per target", flush=True)
        for t in targets:
            measure(t, args.warmup)
    for rnd in range(args.rounds):
        shift = rnd % len(targets)
        order = targets[shift:] + targets[:shift]
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
        for t in order:
            result = measure(t, args.duration)
            if result is not None:
                t.runs.append(result)
                cpu = "" if result.cpu_us_per_req is None else f", {result.cpu_us_per_req:.1f}"
                print(
                    f"  {t.name:<22} {result.rps:>10,.0f} req/s  p50 {fmt_us(result.p50_us)}"
                    f"  p99 {fmt_us(result.p99_us)}{cpu} CPU µs/req"
                    + f"  other load {result.other_cores or 0:.2f} cores"
                    + (f"  ERRORS {result.errors}" if result.errors else ""),
                    flush=True,
                )

    for t in targets:
        if t.is_sidecar and t.server.alive():
            t.peak_rss_kib = proc_status_kib(t.server.pid, "VmHWM")
            assert t.admin_port is not None
            t.metrics = sidecar_metrics(t.admin_port) or t.metrics

    RESULTS_DIR.mkdir(exist_ok=True)
    for t in targets:
        if t.is_sidecar:
            t.log_summary = summarize_log(t.server.log_path)
            shutil.copyfile(t.server.log_path, RESULTS_DIR / f"{t.server.log_path.stem}.log")

    text = report(targets, args, info, time.monotonic() - t0)
    print()
    print(text, end="")
    (RESULTS_DIR / "latest.md").write_text(text)
    raw = {
        "args": vars(args),
        "targets": [
            {
                "name": t.name,
                "rules": t.rules,
                "failure": t.failure,
                "startup_s": t.startup_s,
                "idle_rss_kib": t.idle_rss_kib,
                "peak_rss_kib": t.peak_rss_kib,
                "metrics": t.metrics,
                "runs": [vars(r) for r in t.runs],
            }
            for t in targets
        ],
    }
    (RESULTS_DIR / "latest.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"\nwritten to {RESULTS_DIR / 'latest.md'} (raw numbers: latest.json)")

    for t in targets:
        for count, desc, example in t.log_summary:
            print(f"\n{t.name}: {count:,}x {desc}; first occurrence:\n{example}")
        if t.log_summary:
            print(f"(full output: {RESULTS_DIR / (t.server.log_path.stem + '.log')})")
    failed = [t.name for t in targets if t.failure or not t.runs]
    if failed:
        print(f"\nFAILED targets: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("nginx", "wrk", "caddy"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing; run bench/run.sh (installs it)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    servers: list[Server] = []
    try:
        arm(args.budget)
        return bench(args, tmp, servers)
    except BenchError as exc:
        print(f"\nbench: {exc}", file=sys.stderr)
        args.keep_tmp = True  # its configs and logs explain the failure
        return 1
    except Interrupted as exc:
        print(f"\nbench: {exc}", file=sys.stderr)
        return 130
    finally:
        shield()
        for server in reversed(servers):
            server.stop()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            print(f"temp dir kept: {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
