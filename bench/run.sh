#!/usr/bin/env bash
# Benchmark the sidecar against nginx and Caddy doing the same job on 127.0.0.1.
#
#   bash bench/run.sh            # 3 alternating rounds of 10 s per target (~4-5 min)
#   bash bench/run.sh --quick    # 1 round of 3 s per target (~1 min)
#   bash bench/run.sh --help     # every option (rounds, duration, connections, rule count, ...)
#
# Needs nginx, wrk and caddy (installed with apt-get when missing and running as root) and a
# Python (PYTHON=..., default python3) where the sidecar is installed (pip install -e .).
# The orchestration lives in bench/bench.py; results go to bench/results/latest.{md,json}.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

die() {
    echo "bench: $*" >&2
    exit 1
}

missing_tools() {
    local tool out=()
    for tool in nginx wrk caddy; do
        command -v "$tool" >/dev/null 2>&1 || out+=("$tool")
    done
    echo "${out[*]:-}"
}

missing="$(missing_tools)"
if [[ -n "$missing" ]]; then
    if [[ "$(id -u)" != 0 ]]; then
        die "missing tools: $missing; install them as root: apt-get install -y nginx-light wrk caddy"
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing tools: $missing, and apt-get is not available"
    echo "bench: installing nginx-light wrk caddy (missing: $missing) ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >/dev/null ||
        die "apt-get update failed or timed out; cannot install: $missing"
    timeout 600 apt-get install -y -qq nginx-light wrk caddy >/dev/null ||
        die "apt-get install -y nginx-light wrk caddy failed or timed out; missing: $missing"
    missing="$(missing_tools)"
    [[ -z "$missing" ]] || die "still missing after apt-get install: $missing"
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set PYTHON=...)"
timeout 60 "$PYTHON" -c 'import sidecar, aiohttp' 2>/dev/null ||
    die "'$PYTHON' cannot import the sidecar; run: pip install -e $(dirname "$here")"

# bench.py owns cleanup (try/finally, signal handlers, and PR_SET_PDEATHSIG on every server it
# starts), so exec keeps signals going straight to it.
exec "$PYTHON" "$here/bench.py" "$@"
