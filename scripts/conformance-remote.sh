#!/usr/bin/env bash
# Runs the conformance runner's remote scenarios against a live `tandem cloud serve` over mTLS:
# a throw-away PKI, the signed digits bundle, loopback only. Needs a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
dir=$(mktemp -d)
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$dir"' EXIT
"$bin/tandem" pki init "$dir/pki" >/dev/null
# Port 0: the cloud binds a free port and logs it ("tandem cloud listening on 127.0.0.1:P").
# (A random port in 20000-39999 could be in use: most of it is the ephemeral range.)
cat > "$dir/cloud.toml" <<TOML
listen = "127.0.0.1:0"
pki_dir = "$dir/pki"
models = ["$PWD/models/digits"]
verifying_key = "$PWD/models/dev-verifying-key.txt"
key_store = "$dir/keys.redb"
TOML
"$bin/tandem" cloud serve --config "$dir/cloud.toml" >"$dir/cloud.log" 2>&1 &
pid=$!
# Up to 60 s (was 5 s, then the runner went ahead whether or not the cloud listened): the
# cloud prepares its model before it binds, which takes longer on a loaded CI machine.
port=
for _ in $(seq 600); do
  port=$(grep -o "listening on 127\.0\.0\.1:[0-9]*" "$dir/cloud.log" | head -n 1 | cut -d: -f2 || true)
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$port" ]; then
  echo "conformance-remote: tandem cloud serve did not start listening; its log:" >&2
  cat "$dir/cloud.log" >&2
  exit 1
fi
digest=$(sha256sum models/digits/manifest.toml | cut -d' ' -f1)
"$bin/tandem-conformance" remote --server "127.0.0.1:$port" --pki "$dir/pki" \
  --device device-1 --model digits-mlp --digest "$digest" \
  --layer 1 --width 32   # models/digits: manifest index 1 is its cloud layer fc1, 32 inputs
