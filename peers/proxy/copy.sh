#!/usr/bin/env bash
# The svclb proxy's two TCP pumps side by side, in one go on this machine:
# `--copy splice` (splice(2), socket -> pipe -> socket in the kernel) and
# `--copy userspace` (read into a buffer, write it out).
#
#   peers/proxy/copy.sh [--seconds N] [--rounds N] [--tests "T ..."]
#
# --tests picks among throughput_mb_s cpu_ms_per_gb conn_per_sec
# req_per_sec (all by default).
#
# The set-up is peers/proxy/run.sh's: one nginx serving a 612-byte page on
# 127.0.250.1-3:18080 and one iperf3 server on 127.0.250.1:5201; two
# proxies (one per pump, --threads 1, pinned to CPU 1 when taskset is
# there) on 127.0.251.1 (splice) and 127.0.251.4 (userspace), loaded one at
# a time. Each test runs N seconds (default 3) per pump, in --rounds rounds
# (default 3) in alternating order; each value is the median of its rounds.
# Load: iperf3 through each (throughput, MB/s = 10^6 bytes/s; and, held at
# 200 MB/s, the proxy's CPU milliseconds per 10^9 bytes), wrk with
# `Connection: close` (new connections/s), wrk keep-alive (req/s).
# Output: JSON lines {"copy": "splice" | "userspace", "test": T, "value": X},
# then a markdown table with the ratio splice / userspace. Installs nginx,
# wrk and iperf3 from Debian when run as root. CI does not run it.
set -euo pipefail

SECONDS_PER_TEST=3
ROUNDS=3
TESTS="throughput_mb_s cpu_ms_per_gb conn_per_sec req_per_sec"
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_TEST="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --tests) TESTS="$2"; shift 2 ;;
        *) echo "usage: $0 [--seconds N] [--rounds N] [--tests \"T ...\"]" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="$(mktemp -d /tmp/svclb-peers-copy.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || ! need iperf3; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk iperf3 >/dev/null
    else
        echo "$0: needs nginx, wrk, iperf3 (run as root to install)" >&2
        exit 1
    fi
fi
PIN=()
if need taskset && [ "$(nproc)" -ge 2 ]; then PIN=(taskset -c 1); fi

(cd "$ROOT" && cargo build --quiet --release --example proxy --features serde)
PROXY_BIN="$ROOT/target/release/examples/proxy"

B1=127.0.250.1; B2=127.0.250.2; B3=127.0.250.3; BPORT=18080
SPLICE=127.0.251.1; USERSPACE=127.0.251.4

mkdir -p "$WORK/www" "$WORK/backend"
head -c 612 /dev/zero | tr '\0' 'x' > "$WORK/www/index.html"
cat > "$WORK/backend/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen $B1:$BPORT; listen $B2:$BPORT; listen $B3:$BPORT;
        root $WORK/www;
    }
}
CONF
nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
iperf3 -s -B $B1 -p 5201 >/dev/null 2>&1 &
PIDS+=($!)

manifest() { # cluster IP
    cat <<CONF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: $1
  ports:
  - {name: http, port: 8080, targetPort: $BPORT, protocol: TCP}
  - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: $BPORT, protocol: TCP}]
endpoints:
- addresses: ["10.244.250.1"]
- addresses: ["10.244.250.2"]
- addresses: ["10.244.250.3"]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: iperf, port: 5201, protocol: TCP}]
endpoints:
- addresses: ["10.244.250.1"]
CONF
}
declare -A PROXY_PID=()
for copy in splice userspace; do
    ip=$SPLICE; [ $copy = userspace ] && ip=$USERSPACE
    manifest $ip > "$WORK/$copy.yaml"
    "${PIN[@]}" "$PROXY_BIN" --manifests "$WORK/$copy.yaml" --service-cidr 127.0.251.0/24 \
        --connect-map 10.244.250.0/24=127.0.250.0/24 --mode ipvs --scheduler rr --threads 1 \
        --copy $copy > "$WORK/$copy.log" 2>&1 &
    PIDS+=($!)
    PROXY_PID[$copy]=$!
done

for addr in $B1:$BPORT $B1:5201 $SPLICE:8080 $USERSPACE:8080 $SPLICE:5201 $USERSPACE:5201; do
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then break; fi
        sleep 0.1
    done
done

RESULTS="$WORK/results"
: > "$RESULTS"
rps() { awk '/^Requests\/sec:/ { printf "%.0f", $2; found = 1 } END { if (!found) printf "null" }'; }
measure() { # test host proxy-pid
    local out
    case $1 in
        conn_per_sec)
            out="$(wrk -t1 -c50 -d"${SECONDS_PER_TEST}s" -H 'Connection: close' "http://$2:8080/" 2>&1 || true)"
            rps <<<"$out" ;;
        req_per_sec)
            out="$(wrk -t1 -c50 -d"${SECONDS_PER_TEST}s" "http://$2:8080/" 2>&1 || true)"
            rps <<<"$out" ;;
        cpu_ms_per_gb)
            # The proxy's CPU time (user + system, /proc/PID/stat) per 10^9
            # bytes of an iperf3 run held at 200 MB/s: the same bytes for
            # both pumps, so the cost is compared, not what a shared CPU
            # happens to leave over.
            local pid=$3 before after
            before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
            out="$(iperf3 -c "$2" -p 5201 -t "$SECONDS_PER_TEST" -b 1600M -J 2>/dev/null || true)"
            after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
            python3 -c 'import json,sys,os
try:
    b = json.loads(sys.argv[3])["end"]["sum_received"]["bytes"]
    ms = (int(sys.argv[2]) - int(sys.argv[1])) * 1000 / os.sysconf("SC_CLK_TCK")
    print("%.1f" % (ms / (b / 1e9)))
except Exception: print("null")' "$before" "$after" "$out" ;;
        throughput_mb_s)
            out="$(iperf3 -c "$2" -p 5201 -t "$SECONDS_PER_TEST" -J 2>/dev/null || true)"
            python3 -c 'import json,sys
try: print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8e6))
except Exception: print("null")' <<<"$out" ;;
    esac
}
median() { python3 -c 'import sys, statistics
v = [float(x) for x in sys.argv[1:] if x != "null"]
print(round(statistics.median(v), 3) if v else "null")' "$@"; }

COPIES=(splice userspace)
for test in $TESTS; do
    declare -A vals=()
    for r in $(seq 0 $((ROUNDS - 1))); do
        for j in 0 1; do
            copy=${COPIES[$(((j + r) % 2))]}
            host=$SPLICE; [ $copy = userspace ] && host=$USERSPACE
            vals[$copy]+=" $(measure $test $host "${PROXY_PID[$copy]}")"
        done
    done
    for copy in "${COPIES[@]}"; do
        printf '{"copy": "%s", "test": "%s", "value": %s}\n' "$copy" "$test" "$(median ${vals[$copy]})" | tee -a "$RESULTS"
    done
    unset vals
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
v = {(r["copy"], r["test"]): r["value"] for r in rows}
print()
print("| test | splice | userspace | splice / userspace |")
print("|---|---:|---:|---:|")
for t in dict.fromkeys(r["test"] for r in rows):
    a, b = v.get(("splice", t)), v.get(("userspace", t))
    r = f"{a / b:.2f}" if a and b else "n/a"
    print(f"| {t} | {a} | {b} | {r} |")
PY
