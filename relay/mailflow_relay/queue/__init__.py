"""The durable queue: on-disk records, the spool, bounces and queue administration."""
