"""Per-VM domain sockets: varstored's XML-RPC and swtpm's REST, one VM each."""
