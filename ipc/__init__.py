"""The floor of quantad: wire protocol and clients.  Imports nothing else of ours, no torch."""
