"""The OpenAI-compatible HTTP front: a client of the daemon's agent socket (``ipc`` only), so a daemon-free layer."""
