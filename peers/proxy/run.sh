#!/usr/bin/env bash
# The same load through the svclb proxy (examples/proxy.rs), HAProxy
# (mode tcp, roundrobin), nginx's stream module and a direct connection to
# one backend, in one go on this machine.
#
#   peers/proxy/run.sh [--seconds N] [--rounds N]
#
# Each test runs N seconds per proxy, in --rounds rounds (default 3) with the
# proxies in rotated order; each value is the median of its rounds.
#
# Backends: one nginx (Debian's) serving a 612-byte static page on
# 127.0.250.1-3:18080 (the same 3 for every proxy), and one iperf3 server on
# 127.0.250.1:5201. Each proxy gets one worker thread (svclb --threads 1,
# HAProxy nbthread 1, nginx worker_processes 1), pinned to CPU 1 when
# taskset is there; wrk runs one thread with 50 connections.
# Load: wrk keep-alive (req/s, p99 latency), wrk with `Connection: close`
# (one request per connection: new connections/s), iperf3 through each
# proxy (throughput, MB/s = 10^6 bytes/s).
# Output: JSON lines {"proxy": P, "test": T, "value": X} on stdout, then a
# markdown table. Installs haproxy, nginx, libnginx-mod-stream, wrk and
# iperf3 from Debian when run as root. CI does not run it.
set -euo pipefail

SECONDS_PER_TEST=10
ROUNDS=3
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_TEST="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        *) echo "usage: $0 [--seconds N] [--rounds N]" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="$(mktemp -d /tmp/svclb-peers-proxy.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx || ! need wrk || ! need iperf3 || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx libnginx-mod-stream wrk iperf3 >/dev/null
    else
        echo "$0: needs haproxy, nginx, libnginx-mod-stream, wrk, iperf3 (run as root to install)" >&2
        exit 1
    fi
fi
PIN=()
if need taskset && [ "$(nproc)" -ge 2 ]; then PIN=(taskset -c 1); fi

(cd "$ROOT" && cargo build --quiet --release --example proxy --features serde)
PROXY_BIN="$ROOT/target/release/examples/proxy"

B1=127.0.250.1; B2=127.0.250.2; B3=127.0.250.3; BPORT=18080
SVCLB=127.0.251.1; HAPROXY=127.0.251.2; NGINX=127.0.251.3

# Backends: nginx serving one static page on three addresses.
mkdir -p "$WORK/www" "$WORK/backend" "$WORK/nginx"
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

# svclb: manifests with endpoints 10.244.250.1-3, dialled on 127.0.250.1-3.
cat > "$WORK/svclb.yaml" <<CONF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: $SVCLB
  ports:
  - {name: http, port: 8080, targetPort: $BPORT, protocol: TCP}
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
apiVersion: v1
kind: Service
metadata: {name: iperf, namespace: default}
spec:
  clusterIP: $SVCLB
  ports:
  - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: iperf-1, namespace: default, labels: {kubernetes.io/service-name: iperf}}
addressType: IPv4
ports: [{name: iperf, port: 5201, protocol: TCP}]
endpoints:
- addresses: ["10.244.250.1"]
CONF
"${PIN[@]}" "$PROXY_BIN" --manifests "$WORK/svclb.yaml" --service-cidr 127.0.251.0/24 \
    --connect-map 10.244.250.0/24=127.0.250.0/24 --mode ipvs --scheduler rr --threads 1 \
    > "$WORK/svclb.log" 2>&1 &
PIDS+=($!)

cat > "$WORK/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend web
    bind $HAPROXY:8080
    default_backend web
backend web
    balance roundrobin
    server b1 $B1:$BPORT
    server b2 $B2:$BPORT
    server b3 $B3:$BPORT
frontend iperf
    bind $HAPROXY:5201
    default_backend iperf
backend iperf
    server i1 $B1:5201
CONF
"${PIN[@]}" haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
PIDS+=($!)

cat > "$WORK/nginx/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 8192; }
stream {
    upstream web { server $B1:$BPORT; server $B2:$BPORT; server $B3:$BPORT; }
    server { listen $NGINX:8080; proxy_pass web; }
    server { listen $NGINX:5201; proxy_pass $B1:5201; }
}
CONF
"${PIN[@]}" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

# Wait (bounded) for every listener.
for addr in $B1:$BPORT $B1:5201 $SVCLB:8080 $HAPROXY:8080 $NGINX:8080; do
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then break; fi
        sleep 0.1
    done
done

RESULTS="$WORK/results"
: > "$RESULTS"
emit() { # proxy test value
    printf '{"proxy": "%s", "test": "%s", "value": %s}\n' "$1" "$2" "$3" | tee -a "$RESULTS"
}
# wrk's latency in ms from "99%  1.23ms" (us, ms or s).
p99_ms() {
    awk '$1 == "99%" { v = $2; u = v; gsub(/[0-9.]/, "", u); sub(/[a-z]+$/, "", v);
        if (u == "us") v /= 1000; else if (u == "s") v *= 1000; printf "%.3f", v; found = 1 }
        END { if (!found) printf "null" }'
}
host_of() {
    case $1 in
        direct) echo "$B1:$BPORT" ;;
        svclb) echo "$SVCLB:8080" ;;
        haproxy) echo "$HAPROXY:8080" ;;
        nginx) echo "$NGINX:8080" ;;
    esac
}
rps() { awk '/^Requests\/sec:/ { printf "%.0f", $2; found = 1 } END { if (!found) printf "null" }'; }

# One measurement: test proxy -> value.
measure() {
    local test=$1 name=$2 host port=8080 out
    case $name in
        direct) host=$B1; port=$BPORT ;;
        svclb) host=$SVCLB ;;
        haproxy) host=$HAPROXY ;;
        nginx) host=$NGINX ;;
    esac
    case $test in
        req_per_sec|p99_ms)
            out="$(wrk -t1 -c50 -d"${SECONDS_PER_TEST}s" --latency "http://$host:$port/" 2>&1 || true)"
            if [ "$test" = req_per_sec ]; then rps <<<"$out"; else p99_ms <<<"$out"; fi ;;
        conn_per_sec)
            out="$(wrk -t1 -c50 -d"${SECONDS_PER_TEST}s" -H 'Connection: close' "http://$host:$port/" 2>&1 || true)"
            rps <<<"$out" ;;
        throughput_mb_s)
            [ "$name" = direct ] && host=$B1
            out="$(iperf3 -c "$host" -p 5201 -t "$SECONDS_PER_TEST" -J 2>/dev/null || true)"
            python3 -c 'import json,sys
try: print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8e6))
except Exception: print("null")' <<<"$out" ;;
    esac
}
median() { python3 -c 'import sys, statistics
v = [float(x) for x in sys.argv[1:] if x != "null"]
print(round(statistics.median(v), 3) if v else "null")' "$@"; }

# The machine is shared: the proxies take turns, in rotated order, for
# ROUNDS rounds per test, and each value is the median of its rounds, so a
# load that drifts during the run falls on all of them alike.
PROXIES=(svclb haproxy nginx direct)
for test in conn_per_sec req_per_sec throughput_mb_s; do
    declare -A vals=()
    for r in $(seq 0 $((ROUNDS - 1))); do
        for j in 0 1 2 3; do
            name=${PROXIES[$(((j + r) % 4))]}
            if [ "$test" = req_per_sec ]; then
                # req/s and p99 from the same keep-alive run.
                out="$(wrk -t1 -c50 -d"${SECONDS_PER_TEST}s" --latency "http://$(host_of "$name")/" 2>&1 || true)"
                vals[$name,req]+=" $(rps <<<"$out")"
                vals[$name,p99]+=" $(p99_ms <<<"$out")"
            else
                vals[$name,x]+=" $(measure "$test" "$name")"
            fi
        done
    done
    for name in "${PROXIES[@]}"; do
        if [ "$test" = req_per_sec ]; then
            emit "$name" req_per_sec "$(median ${vals[$name,req]})"
            emit "$name" p99_ms "$(median ${vals[$name,p99]})"
        else
            emit "$name" "$test" "$(median ${vals[$name,x]})"
        fi
    done
    unset vals
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tests = ["conn_per_sec", "req_per_sec", "p99_ms", "throughput_mb_s"]
proxies = ["svclb", "haproxy", "nginx", "direct"]
v = {(r["proxy"], r["test"]): r["value"] for r in rows}
print()
print("| proxy | " + " | ".join(tests) + " |")
print("|---|" + "---:|" * len(tests))
for p in proxies:
    print(f"| {p} | " + " | ".join(str(v.get((p, t))) for t in tests) + " |")
h = lambda t: v.get(("haproxy", t))
s = lambda t: v.get(("svclb", t))
def ratio(t):
    a, b = s(t), h(t)
    return f"{a / b:.2f}" if a and b else "n/a"
print()
print("| target | svclb / haproxy | met |")
print("|---|---:|---|")
for t, goal, ok in [
    ("conn_per_sec", ">= 1.0", lambda r: r >= 1.0),
    ("req_per_sec", ">= 0.9", lambda r: r >= 0.9),
    ("throughput_mb_s", ">= 0.9", lambda r: r >= 0.9),
    ("p99_ms", "<= 1.0", lambda r: r <= 1.0),
]:
    r = ratio(t)
    met = "yes" if r != "n/a" and ok(float(r)) else "no"
    print(f"| {t} {goal} | {r} | {met} |")
PY
