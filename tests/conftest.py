"""Settings for the whole test session."""

import os

# The test command runs two pytest workers on a 2-core runner. A second OpenMP thread per process
# then only spins against the other worker (steps several times slower), so every test process,
# and every `python -m semodel` it starts, uses one intra-op thread unless the caller set it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
