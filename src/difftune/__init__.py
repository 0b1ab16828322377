"""difftune: train and fine-tune diffusion image models from one small, tested core."""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that wait by sleeping, not spinning, unless the user chose: on a CPU
# shared with another busy process, spinning threads take the cores their siblings need
# (the demo fell from ~110 to 1.5-5 samples/s beside one busy process on 2 cores).
# Read once, when torch's OpenMP runtime starts: so before torch is imported.
# benchmarks/contention/run.py measures it.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
