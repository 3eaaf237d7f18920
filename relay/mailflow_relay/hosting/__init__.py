"""Running the relay as a process: serve, the cluster Secret source, HTTP endpoints."""
