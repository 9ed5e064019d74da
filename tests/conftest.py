import os

# Tests run on the CPU with deterministic, small thread pools.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
