"""A 2-D playground for the preference objectives (examples/toy2d/README.md)."""
