"""The privileged AMP control channel and its command-line client."""
