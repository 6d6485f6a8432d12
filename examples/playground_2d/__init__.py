"""A 2-D playground for the preference objectives (examples/playground_2d/README.md)."""
