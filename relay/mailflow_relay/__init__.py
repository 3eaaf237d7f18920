"""Mailflow's SMTP relay: accept, spool, route and deliver outbound mail.

This package owns the routing-document format and the router. It never imports the
operator package; the operator imports it to produce documents.
"""

__version__ = "0.1.0"
