"""Test and benchmark support shipped with the package (the xapi simulator)."""
