import os

import torch

# 2-core CI: one thread per process keeps tests fast and distributed tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
