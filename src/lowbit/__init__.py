"""lowbit: post-training quantization of large language models."""

import os

# Calibration pushes every sample through a block at once, so the CPU allocator hands out tensors
# of hundreds of MB; backing them with transparent huge pages avoids much of the time the forward
# passes otherwise spend in page faults. torch reads this once, at import, so it is set before
# anything imports torch; a value the user exported wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
