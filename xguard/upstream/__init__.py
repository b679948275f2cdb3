"""Upstream stores: xapi over JSON-RPC, or the embedded SQLite store."""
