#!/usr/bin/env bash
# The public API check: svclb's public surface, from rustdoc's JSON (a
# nightly-only output), reduced by .ci/public-api.py to one sorted line per
# item, against the committed snapshot docs/public-api.txt.
#
#   .ci/public-api.sh          # diff; exit 1 if the surface changed
#   .ci/public-api.sh --bless  # rewrite the snapshot (commit it with the change)
#
# Without a nightly toolchain it prints SKIPPED and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "public API check SKIPPED: no nightly toolchain (rustup toolchain install nightly to enable)"
  exit 0
fi
# All features: the k8s-openapi conversions are public API too.
RUSTDOCFLAGS="" cargo +nightly rustdoc --quiet --lib --all-features --features k8s-openapi/latest -- \
  -Z unstable-options --output-format json
current="$(mktemp)"
python3 .ci/public-api.py target/doc/svclb.json >"$current"
if [ "${1:-}" = "--bless" ]; then
  mv "$current" docs/public-api.txt
  echo "docs/public-api.txt: $(wc -l <docs/public-api.txt) items"
  exit 0
fi
if diff -u docs/public-api.txt "$current"; then
  echo "public API unchanged ($(wc -l <"$current") items)"
  rm -f "$current"
else
  echo "public API changed (above: - snapshot, + this tree). If intended, run"
  echo ".ci/public-api.sh --bless and commit docs/public-api.txt with the change."
  rm -f "$current"
  exit 1
fi
