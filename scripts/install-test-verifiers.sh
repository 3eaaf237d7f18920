#!/usr/bin/env bash
# Installs the Node.js test verifiers (tests/verifiers/package-lock.json: mailauth, which
# verifies DKIM Ed25519 signatures that Debian 12's Mail::DKIM cannot) from the npm registry.
# Idempotent: nothing to do when node_modules matches the lock file. Without npm, the tests that
# need it are skipped (and fail with CI=true).
set -euo pipefail
cd "$(dirname "$0")/../tests/verifiers"
if ! command -v npm >/dev/null; then
    echo "==> npm not found: the Ed25519 DKIM verification tests will be skipped"
    exit 0
fi
stamp=node_modules/.mailflow-lock.sha256
wanted=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    echo "==> test verifiers present (tests/verifiers/node_modules)"
    exit 0
fi
echo "==> installing the test verifiers (npm ci in tests/verifiers)"
npm ci --no-audit --no-fund --loglevel=error
echo "$wanted" >"$stamp"
