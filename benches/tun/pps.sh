#!/usr/bin/env bash
# Packets per second through examples/tun.rs, on the loopback of a throwaway
# network namespace (svtun-bench-$$): a UDP pusher sends COUNT datagrams of
# SIZE payload bytes to the cluster IP 10.96.77.10:53 as fast as it can; each
# crosses the TUN device to the example, is DNATed and SNATed and written
# back, and reaches a sink on one of three backends (10.77.0.1-3:5353). The
# figure is the datagrams the sinks received over the time from the first to
# the last, the example's own count of packets NATed, and that count over
# the example's CPU time (user + system, from /proc: on a shared machine
# the wall-clock rate depends on the other load, the CPU rate much less).
#
#   bash benches/tun/pps.sh [COUNT] [SIZE]        (as root; default 200000 64)
#
# One direction only (no replies): the reverse path is the same code (parse,
# one tracker lookup, two rewrites) and the netns test covers it.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${1:-200000}"
size="${2:-64}"
ns="svtun-bench-$$"
dir="$(mktemp -d)"
cleanup() {
  [ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

cargo build --quiet --release --example tun --features packet,serde
cat >"$dir/echo.yaml" <<'YAML'
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: svtun}
spec:
  clusterIP: 10.96.77.10
  ports:
  - {name: udp, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: svtun, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
- {name: udp, port: 5353, protocol: UDP}
endpoints:
- addresses: ["10.77.0.1"]
- addresses: ["10.77.0.2"]
- addresses: ["10.77.0.3"]
YAML

ip netns add "$ns"
ip -n "$ns" link set lo up
for a in 1 2 3; do ip -n "$ns" addr add "10.77.0.$a/32" dev lo; done
ip netns exec "$ns" target/release/examples/tun --manifests "$dir" --dev svtun0 >"$dir/out" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q '^ready' "$dir/out" 2>/dev/null && break; sleep 0.05; done
grep -q '^ready' "$dir/out" || { cat "$dir/out"; exit 1; }
ip netns exec "$ns" ethtool -K svtun0 tx off rx off >/dev/null 2>&1 || true
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
cpu0="$(cpu)"

ip netns exec "$ns" python3 - "$count" "$size" <<'PY'
import os, socket, sys, threading, time
count, size = int(sys.argv[1]), int(sys.argv[2])
got = [0, 0, 0]
first, last = [None], [None]
def sink(i):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    s.bind((f"10.77.0.{i+1}", 5353))
    s.settimeout(1.0)
    while True:
        try:
            s.recv(2048)
        except socket.timeout:
            return
        t = time.perf_counter()
        if first[0] is None:
            first[0] = t
        last[0] = t
        got[i] += 1
threads = [threading.Thread(target=sink, args=(i,)) for i in range(3)]
for t in threads: t.start()
time.sleep(0.2)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * size
# One flow per datagram is not what a proxy sees; 64 flows (source ports)
# round-robin, so that the tracker answers most packets.
socks = []
for _ in range(64):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect(("10.96.77.10", 53))
    socks.append(u)
t0 = time.perf_counter()
sent = 0
for i in range(count):
    try:
        socks[i & 63].send(payload)
        sent += 1
    except OSError:
        pass
t1 = time.perf_counter()
for t in threads: t.join()
n = sum(got)
span = (last[0] - first[0]) if n > 1 else float("nan")
print(f"sent {sent} in {t1 - t0:.3f} s ({sent / (t1 - t0):,.0f}/s offered); "
      f"received {n} ({n / max(sent, 1):.1%}) per backend {got}; "
      f"{n / span:,.0f} datagrams/s through the TUN dataplane over {span:.3f} s")
PY
cpu1="$(cpu)"
kill -TERM "$pid"; wait "$pid" || true; pid=
stats="$(grep '^stats' "$dir/out")"
echo "$stats"
dnat="$(echo "$stats" | sed 's/.* dnat \([0-9]*\).*/\1/')"
hz="$(getconf CLK_TCK)"
awk -v n="$dnat" -v t0="$cpu0" -v t1="$cpu1" -v hz="$hz" 'BEGIN {
  s = (t1 - t0) / hz
  printf "example CPU time %.2f s (user + system): %.0f packets per CPU second\n", s, (s > 0 ? n / s : 0)
}'
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(date -u '+%Y-%m-%d %H:%M UTC'); load $(cut -d' ' -f1-3 /proc/loadavg)"
