"""Private APIs of the libraries xguard builds on, each used for a reason
it states, confined here (one module per library) so an upgrade that
changes one fails ``tests/unit/test_internals.py`` loudly instead of
breaking xguard silently."""
