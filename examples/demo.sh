#!/usr/bin/env bash
# `make demo`: validate the example manifests, explain their routes, then deliver a real
# message through every example connector to local destination servers.
set -euo pipefail
cd "$(dirname "$0")/.."
MAILFLOW=.venv/bin/mailflow

echo "==> mailflow validate crds/ examples/"
$MAILFLOW validate crds/ examples/
echo

echo "==> mailflow explain: one recipient per example connector"
$MAILFLOW explain examples/ --from alice@contoso.com \
  --to partner@fabrikam.example \
  --to sales@emea.fabrikam.example \
  --to someone@elsewhere.example \
  --to info@smallpartner.example \
  --to backup@archive.contoso.example \
  --to ops@it.subsidiaries.example \
  --to treasury@bank.example \
  --to hr@payroll.example
echo "==> the same recipient from the marketing subdomain takes the sender-scoped connector"
$MAILFLOW explain examples/ --from news@marketing.contoso.com --to someone@elsewhere.example
echo "==> and a broken folder gets one line per problem (exit 1 is expected here)"
$MAILFLOW validate tests/fixtures/broken/ || echo "(mailflow validate exited $?)"
echo
echo "==> real delivery: mailflow relay with the examples, destination servers on loopback"
.venv/bin/python examples/demo.py
