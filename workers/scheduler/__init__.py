"""The scheduler worker: answers placement requests from its mirror of nodes and assignments.
The solver (`placement.py`) is pure NumPy, so the same function can run on Ray shards."""
