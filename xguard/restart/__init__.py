"""Restarts no VM notices: every listening socket is handed to the next
process (systemd's fd store, or an in-place re-exec), with systemd's
protocols they use (``LISTEN_FDS``, ``sd_notify``)."""
