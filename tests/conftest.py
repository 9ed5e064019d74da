import os

# Tests run on the CPU with deterministic, small thread pools.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Two host CPU devices, like the 2-core development machine, so the sharded
# client engine is exercised whatever machine runs the tests.
jax.config.update("jax_num_cpu_devices", 2)
