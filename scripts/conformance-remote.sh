#!/usr/bin/env bash
# Runs the conformance runner's remote scenarios against a live `tandem cloud serve` over mTLS:
# a throw-away PKI, the signed digits bundle, loopback only. Needs a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
dir=$(mktemp -d)
port=$(( 20000 + RANDOM % 20000 ))
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$dir"' EXIT
"$bin/tandem" pki init "$dir/pki" >/dev/null
cat > "$dir/cloud.toml" <<TOML
listen = "127.0.0.1:$port"
pki_dir = "$dir/pki"
models = ["$PWD/models/digits"]
verifying_key = "$PWD/models/dev-verifying-key.txt"
key_store = "$dir/keys.redb"
TOML
"$bin/tandem" cloud serve --config "$dir/cloud.toml" >"$dir/cloud.log" 2>&1 &
pid=$!
for _ in $(seq 50); do
  grep -q "listening" "$dir/cloud.log" && break
  sleep 0.1
done
digest=$(sha256sum models/digits/manifest.toml | cut -d' ' -f1)
"$bin/tandem-conformance" remote --server "127.0.0.1:$port" --pki "$dir/pki" \
  --device device-1 --model digits-mlp --digest "$digest" \
  --layer 1 --width 32   # models/digits: manifest index 1 is its cloud layer fc1, 32 inputs
