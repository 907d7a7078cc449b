"""recsim: a harness for LLM recommenders whose users' preferences evolve over time."""

import os

# OpenMP threads that spin while waiting make every torch op ~10x slower as soon as another process
# shares the cores (seen here on 2 cores: a SASRec step 0.15 s -> 1.5 s). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
