"""Pure-NumPy references: the readable definitions of every op, and the
fallback backend when nothing compiled can run."""
