"""Small utilities with no knowledge of VMs: durable file writes, keyed
locks, one-shot observers, deadlines, UNIX socket probes, the I/O threads."""
