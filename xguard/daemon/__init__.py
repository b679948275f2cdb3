"""The daemon's assembly and process: the command and its options, the
composition root that builds every part, the service that starts and stops
them in order, and what concerns the process as a whole (exit status,
limits, memory, where the log goes, the metrics endpoint)."""
