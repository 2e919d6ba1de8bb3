#!/usr/bin/env bash
# Times Zama's concrete-ml-extensions 0.2.0 (PyPI, 1 thread) beside `tandem bench matmul`
# (1 thread, packed and no-key) on the same shapes, in one run, and prints both and the ratio.
# The peer is installed into a throw-away venv that is removed on exit.
#   bash scripts/peer-bench.sh                       # default shapes
#   bash scripts/peer-bench.sh 1x1024@1024x1024 16x384@384x1536
set -euo pipefail
cd "$(dirname "$0")/.."
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(1x1024@1024x1024 16x384@384x1152 16x384@384x384 16x384@384x1536 16x1536@1536x384)
venv=$(mktemp -d /tmp/peer-bench-venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q "concrete-ml-extensions==0.2.0" numpy
cargo build --release -q --bin tandem
export RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1
for s in "${shapes[@]}"; do
  ours=$(target/release/tandem bench matmul --json --runs 3 --threads 1 --shape "$s")
  peer=$("$venv/bin/python" - "$s" <<'PY'
import json, sys, time
import numpy as np
import concrete_ml_extensions as fhext
b, n, m = (lambda l, r: (int(l.split("x")[0]), int(l.split("x")[1]), int(r.split("x")[1])))(*sys.argv[1].split("@"))
rng = np.random.default_rng(1)
x = rng.integers(-128, 128, size=(b, n), dtype=np.int64)
w = rng.integers(-128, 128, size=(n, m), dtype=np.int64)
params = fhext.MatmulCryptoParameters.deserialize(fhext.default_params())  # default_params() is JSON text
t = time.perf_counter(); pkey, ckey = fhext.create_private_key(params); keygen = time.perf_counter() - t
enc = fhext.encrypt_matrix(pkey, params, x.astype(np.uint64))  # two's complement in uint64
up = len(enc.serialize())
t = time.perf_counter(); res = fhext.matrix_multiplication(enc, w.astype(np.uint64), ckey); server = time.perf_counter() - t
down = len(res.serialize())
num_valid = m % 2048 or 2048  # GLWE values in the last returned ciphertext
y = np.asarray(fhext.decrypt_matrix(res, pkey, params, num_valid)).astype(np.int64)
ref = x @ w
err = int(np.max(np.abs(y.reshape(ref.shape) - ref)))
print(json.dumps({"server_ms": server * 1e3, "keygen_ms": keygen * 1e3, "upload_bytes": up,
                  "download_bytes": down, "eval_key_bytes": len(ckey.serialize()), "max_abs_err": err}))
PY
)
  python3 - "$s" "$ours" "$peer" <<'PY'
import json, sys
shape, ours, peer = sys.argv[1], [json.loads(l) for l in sys.argv[2].splitlines() if l.startswith("{")], json.loads(sys.argv[3])
print(f"{shape}: concrete-ml-extensions 0.2.0 {peer['server_ms']:.1f} ms, up {peer['upload_bytes']}, down {peer['download_bytes']}, key {peer['eval_key_bytes']}, max err {peer['max_abs_err']}")
for r in ours:
    print(f"  tandem {r['mode']:<6} {r['server_ms']:.1f} ms, up {r['upload_bytes']}, down {r['download_bytes']}, key {r['eval_key_bytes']}, max err {r['max_abs_err']}"
          f"  -> peer / tandem = {peer['server_ms'] / r['server_ms']:.1f}x")
PY
done
