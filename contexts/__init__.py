"""Context state of preempted requests: snapshots, tiers and budgets.  Knows nothing of sockets."""
