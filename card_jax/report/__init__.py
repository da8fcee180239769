"""Report over finished card_jax runs and CARD-Decks: tables, the paper's Figures 1, 2 and 4,
report.md and report.json.

  python -m card_jax.report --runs=DIR [DIR ...] --out=REPORT_DIR [--title=...]

Needs only numpy and matplotlib: nothing here imports JAX, Flax, Optax or Orbax (nor any
card_jax module that does), so it runs on a laptop over copied result folders.
"""
