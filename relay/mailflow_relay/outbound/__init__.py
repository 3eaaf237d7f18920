"""Mail out: delivery to the next hop, connection reuse and limits, TLS policy, DNS."""
