#!/usr/bin/env bash
# CPU time per new connection: the svclb proxy (one or two builds) and
# HAProxy, on peers/proxy/run.sh's backends, in one go on this machine.
#
#   peers/proxy/conn_cpu.sh [--seconds N] [--rounds N] [--bin PATH]... [--no-haproxy] [--keep-alive]
#
# Each --bin is a build of examples/proxy (default: this tree's release
# build, built here); two builds compare a change against its base. Every
# proxy runs on one thread (svclb --threads 1 --mode ipvs --scheduler rr,
# HAProxy nbthread 1 mode tcp roundrobin), pinned to CPU 1 when taskset is
# there, and is loaded on its own by `wrk -t1 -c50 -H 'Connection: close'`
# (one request per connection) for N seconds (default 3), in --rounds
# rounds (default 5) in rotated order.
#
# With --keep-alive, wrk keeps its 50 connections open instead, and the
# figures are per request (tests cpu_us_per_req, user_us_per_req,
# sys_us_per_req, req_per_sec).
#
# The figure is the proxy's own CPU time (utime + stime from
# /proc/PID/stat, both directions of every connection) divided by the
# connections wrk completed: microseconds per connection. On a shared
# machine it moves far less than connections/s, which is what the other
# processes leave over. Output: JSON lines {"proxy": P, "test":
# "cpu_us_per_conn" | "user_us_per_conn" | "sys_us_per_conn" |
# "conn_per_sec", "value": X} (medians; P is svclb,
# svclb2, ... in --bin order, or haproxy), then a markdown table with each
# ratio to the first. Installs nginx, haproxy and wrk from Debian when run
# as root. CI does not run it.
set -euo pipefail

SECONDS_PER_TEST=3
ROUNDS=5
BINS=()
HAPROXY_TOO=1
HEADER=(-H 'Connection: close')
UNIT=conn
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_TEST="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --bin) BINS+=("$(realpath "$2")"); shift 2 ;;
        --no-haproxy) HAPROXY_TOO=0; shift ;;
        --keep-alive) HEADER=(); UNIT=req; shift ;;
        *) echo "usage: $0 [--seconds N] [--rounds N] [--bin PATH]... [--no-haproxy] [--keep-alive]" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="$(mktemp -d /tmp/svclb-peers-conncpu.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || { [ "$HAPROXY_TOO" = 1 ] && ! need haproxy; }; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy wrk >/dev/null
    else
        echo "$0: needs nginx, haproxy, wrk (run as root to install)" >&2
        exit 1
    fi
fi
PIN=()
if need taskset && [ "$(nproc)" -ge 2 ]; then PIN=(taskset -c 1); fi

if [ ${#BINS[@]} -eq 0 ]; then
    (cd "$ROOT" && cargo build --quiet --release --example proxy --features serde)
    BINS=("$ROOT/target/release/examples/proxy")
fi

B1=127.0.250.1; B2=127.0.250.2; B3=127.0.250.3; BPORT=18080
HAPROXY=127.0.251.2

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

NAMES=()
declare -A PID_OF=() HOST_OF=()
for i in "${!BINS[@]}"; do
    name=svclb; [ "$i" -gt 0 ] && name="svclb$((i + 1))"
    vip="127.0.252.$((i + 1))"
    cat > "$WORK/$name.yaml" <<CONF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: $vip
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
CONF
    "${PIN[@]}" "${BINS[$i]}" --manifests "$WORK/$name.yaml" --service-cidr 127.0.252.0/24 \
        --connect-map 10.244.250.0/24=127.0.250.0/24 --mode ipvs --scheduler rr --threads 1 \
        > /dev/null 2> "$WORK/$name.err" &
    PIDS+=($!)
    NAMES+=("$name")
    PID_OF[$name]=$!
    HOST_OF[$name]="$vip:8080"
done

if [ "$HAPROXY_TOO" = 1 ]; then
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
CONF
    "${PIN[@]}" haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
    PIDS+=($!)
    NAMES+=(haproxy)
    PID_OF[haproxy]=$!
    HOST_OF[haproxy]="$HAPROXY:8080"
fi

for addr in $B1:$BPORT "${HOST_OF[@]}"; do
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then break; fi
        sleep 0.1
    done
done

# utime and stime of a process, in clock ticks.
ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
HZ="$(getconf CLK_TCK)"
median() { python3 -c 'import sys, statistics
v = [float(x) for x in sys.argv[1:] if x != "null"]
print(round(statistics.median(v), 3) if v else "null")' "$@"; }

declare -A CPU=() USR=() SYS=() RATE=()
n=${#NAMES[@]}
for r in $(seq 0 $((ROUNDS - 1))); do
    for j in $(seq 0 $((n - 1))); do
        name=${NAMES[$(((j + r) % n))]}
        pid=${PID_OF[$name]}
        read -r u0 s0 < <(ticks "$pid")
        out="$(wrk -t1 -c50 -d"${SECONDS_PER_TEST}s" "${HEADER[@]}" "http://${HOST_OF[$name]}/" 2>&1 || true)"
        read -r u1 s1 < <(ticks "$pid")
        reqs="$(awk '/requests in/ { print $1 }' <<<"$out")"
        rate="$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$out")"
        if [ -n "$reqs" ] && [ "$reqs" -gt 0 ]; then
            per() { python3 -c "print(round($1 * 1e6 / $HZ / $reqs, 2))"; }
            CPU[$name]+=" $(per "($u1 - $u0 + $s1 - $s0)")"
            USR[$name]+=" $(per "($u1 - $u0)")"
            SYS[$name]+=" $(per "($s1 - $s0)")"
        fi
        RATE[$name]+=" ${rate:-null}"
    done
done

RESULTS="$WORK/results"
: > "$RESULTS"
for name in "${NAMES[@]}"; do
    printf '{"proxy": "%s", "test": "cpu_us_per_%s", "value": %s}\n' "$name" "$UNIT" "$(median ${CPU[$name]:-null})" | tee -a "$RESULTS"
    printf '{"proxy": "%s", "test": "user_us_per_%s", "value": %s}\n' "$name" "$UNIT" "$(median ${USR[$name]:-null})" | tee -a "$RESULTS"
    printf '{"proxy": "%s", "test": "sys_us_per_%s", "value": %s}\n' "$name" "$UNIT" "$(median ${SYS[$name]:-null})" | tee -a "$RESULTS"
    printf '{"proxy": "%s", "test": "%s_per_sec", "value": %s}\n' "$name" "$UNIT" "$(median ${RATE[$name]})" | tee -a "$RESULTS"
done
python3 - "$RESULTS" "$UNIT" <<'PY'
import json, sys
u = sys.argv[2]
rows = [json.loads(l) for l in open(sys.argv[1])]
names = list(dict.fromkeys(r["proxy"] for r in rows))
v = {(r["proxy"], r["test"]): r["value"] for r in rows}
first = names[0]
print()
print(f"| proxy | cpu_us_per_{u} | ÷ " + first + f" | user | sys | {u}_per_sec |")
print("|---|---:|---:|---:|---:|---:|")
for p in names:
    a, b = v.get((p, f"cpu_us_per_{u}")), v.get((first, f"cpu_us_per_{u}"))
    ratio = f"{a / b:.2f}" if a and b else "n/a"
    print(f"| {p} | {a} | {ratio} | {v.get((p, f'user_us_per_{u}'))} | {v.get((p, f'sys_us_per_{u}'))} | {v.get((p, f'{u}_per_sec'))} |")
PY
