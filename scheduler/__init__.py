"""The quantad daemon: request table, run queue and policy.  Uses ``ipc`` only, never torch."""
