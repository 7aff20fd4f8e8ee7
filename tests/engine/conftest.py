"""Engine test setup: tiny CPU models, one intra-op thread.

The test machines are small and shared: with several torch threads per process, OpenMP
contention makes tiny ops hundreds of times slower, so every engine test runs single-threaded.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
