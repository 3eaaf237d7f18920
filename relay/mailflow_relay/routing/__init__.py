"""The routing document (the one contract with the control plane), its domains and the router."""
