"""Fourier heat maps of model error (Yin et al. 2019; Winning Hand Section 2.3; SPEC §6).

`card_jax.fourier.basis` builds the real Fourier basis images, `card_jax.fourier.heatmap`
evaluates a model under every basis perturbation and plots the result.
"""

from __future__ import annotations
