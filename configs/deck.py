"""A CARD-Deck built from finished card_jax runs (paper §3.2, SPEC §0 item 4, §1(c)-(e)).

Command (two AugMix and two Gaussian CARDs: each member workdir brings its R realizations):
  python -m card_jax.main --config=configs/deck.py \
      --config.deck.members=workdirs/augmix,workdirs/gaussian \
      --config.eval.corruption_dir=workdirs/fashion_mnist_c --workdir=workdirs/deck

`deck.members` is a comma-separated list of workdirs or globs (`workdirs/aug*`); `DIR:r`
takes only realization r of DIR. Members must share model (name and kw), dataset, method
(name and scope) and sparsity; their `data.augment` is their gate group, and every group of
`deck.groups` needs the same number of members (n = 2, 4, 6 in the paper: half AugMix, half
Gaussian).

Writes WORKDIR/results.json: clean and 15x5 corruption accuracy of the domain-agnostic deck
(mean of all members' softmaxes), of the domain-adaptive deck (spectral gating per batch of
`gate_batch` test images in file order, then only the chosen group's members) and of every
member alone, the gate's choices per corruption, memory and inference times. The gate's
representatives are kept in WORKDIR/gate/ and reused while their settings stay the same.
The results.json schema is in card_jax/deck/run.py's docstring.
Expected (measured, 2-core CPU): the embedded default's cards, Conv-4 width 0.25 GMP 80%
trained 1 epoch with :augmix and with :gaussian (R = 2 each: a 2 + 2 deck, 0.49 MB),
Fashion-MNIST-C cells of their first 1,000 images: clean accuracy agnostic 0.888 / adaptive
0.886, corrupted 0.830 / 0.830; the gate sends 74% / 46% / 94% of the gaussian / shot /
impulse noise batches to the Gaussian cards and 17% of the clean ones; adaptive inference
about 2-3x faster than agnostic. With deck.gaussian_always_noisy=true the gate sends no clean
and 9% of the non-noise batches to the Gaussian cards (but only 57% of the noise ones) and
the adaptive deck reaches 0.836 corrupted. About 2.5 minutes once the members are trained.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0                          # seed of the representatives' sampling/augmentation
    deck = ml_collections.ConfigDict()
    deck.members = ""                        # DIR[,DIR:r,glob*,...]: finished card_jax runs
    deck.groups = "augmix,gaussian"          # gate groups = members' data.augment values
    deck.representatives = 5000              # P augmented training images per group
    deck.gate_batch = 100                    # M test images per gating decision
    deck.per_example = False                 # gate each image alone instead of each batch
    deck.gaussian_always_noisy = False       # noise on every Gaussian representative (else p=0.5)
    deck.augment_unpadded = False            # augment representatives before zero-padding to
                                             # data.pad_to (as "-C" cells: corrupt, then pad)
    deck.nn = "brute"                        # nearest neighbour: brute (on device) | kdtree (scipy)
    deck.strategy = "auto"                   # member axis: auto | map | vmap (predict.py)
    deck.spectrum = ml_collections.ConfigDict(dict(
        grayscale="mean",                    # mean | luminance | per_channel
        spectrum="power",                    # power (|FFT|^2) | log_magnitude (20 log10(1+|FFT|))
        reciprocal=True,                     # F = 1 / (radial mean + eps), then L2-normalised
        eps=1e-12,
    ))
    config.deck = deck
    ev = ml_collections.ConfigDict()
    ev.batch_size = 250                      # images per agnostic/member evaluation call
                                             # (fits the CPU caches: configs/default.py)
    ev.corruption_dir = ""                   # a "-C" folder (CIFAR-10-C layout); '' = clean only
    ev.corruption_examples = -1              # first N images of each cell (-1 = all)
    ev.extra_corruptions = False             # also the 4 extra corruptions
    config.eval = ev
    if arg == "smoke":
        deck.representatives = 200
        deck.gate_batch = 50
    elif arg:
        raise ValueError(f"configs/deck.py takes no argument or :smoke; got {arg!r}")
    return config
