#!/usr/bin/env bash
# Requirement coverage of specs/protocol.md: prints per-ID citation counts and ends with
# "requirements: T, cited in code: C, cited in tests: E". Exit 1 if any requirement is uncited.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run -q -p tandem-conformance -- coverage "$PWD"
