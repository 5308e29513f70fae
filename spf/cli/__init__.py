"""The ``spf`` command line."""
