"""What xguard keeps per VM, between the faces (domain sockets, control
channel) and the stores (cache, upstream): the views the faces read and
write through, the sinks that alone talk to upstream about a VM's state,
and the last state seen upstream. VM state flows one way through it:
faces → views → writer (the cache) → sinks → upstream."""
