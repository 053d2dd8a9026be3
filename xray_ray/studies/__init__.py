"""Experiments about the search, built on the other wings: controlled ablations and stability over seeds."""
