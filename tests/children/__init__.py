"""Programs the tests start as child processes, ``python -m children.<name>`` (hangs.Watched puts tests/ on
their path)."""
