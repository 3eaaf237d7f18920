"""The compiler: manifests to the relays' routing document, with no cluster and no kopf.

Loads OutboundConnector and MultiSmtpProfile manifests, validates them offline against the
CRDs in ``crds/`` (structural schema and CEL), compiles them into the routing document (the
format is :mod:`mailflow_relay.routing.document`), and explains routing decisions. The
operator, the CLI and the standalone relay all call this one compiler.
"""
