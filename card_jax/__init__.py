"""card_jax: Compact, Accurate and Robust Deep networks (CARDs) in JAX/Flax.

Re-implements "A Winning Hand: Compressing Deep Networks Can Improve Out-of-Distribution
Robustness" (Diffenderfer et al., NeurIPS 2021). Importing the package has no side effects.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 1  # version of the on-disk layout of workdirs and checkpoints
