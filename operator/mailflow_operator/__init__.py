"""The Kubernetes operator (kopf): watches connectors, profiles and Secrets, publishes the
routing document through :mod:`mailflow_compiler`, and reports status, conditions, events
and probes back onto each resource."""
