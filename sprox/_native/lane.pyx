# cython: annotation_typing=False
# The compiled lane: the very source of the pure-Python twin, built by Cython, so the
# two cannot drift apart. (Annotations stay annotations: `x: int` must not become a
# C-level type check on values the twin accepts.)
include "_lane_py.py"
