"""Mailflow's operator and command-line tools.

Compiles OutboundConnector and MultiSmtpProfile resources into the relays' routing
document (the format is :mod:`mailflow_relay.routing`), validates manifests offline
against the CRDs in ``crds/``, and explains routing decisions.
"""

__version__ = "0.1.0"
