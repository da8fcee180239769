"""Real, unit-norm 2-D Fourier basis images for Fourier heat maps (SPEC §6(a)).

Follows Yin et al. 2019 ("A Fourier perspective on model robustness", google-research
`frequency_analysis`) exactly. Positions (i, j) index the *fftshifted* spectrum of an h x w
image, so the lowest frequency (DC) sits at the centre (h // 2, w // 2). A real image has a
Hermitian-symmetric spectrum, so position (i, j) and its symmetric twin describe the same real
basis image; each pair is built once, from the member that comes first in row-major order
(the order in which Yin's loop meets them), and the twin shares it.

Everything here is host-side numpy: the basis is built once per heat map and shipped to the
device as one `[K, h, w]` array.
"""

from __future__ import annotations

import numpy as np


def _symmetric_coord(size: int, p: int) -> int:
    """The shifted-grid index of frequency -f when `p` holds frequency f along one axis.

    Shifted index p holds frequency p - size // 2. For even sizes -f wraps modulo size (the
    Nyquist row p = 0 is its own twin); for odd sizes the grid is symmetric about the centre.
    """
    if size % 2 == 0:
        return (size - p) % size
    return size - 1 - p


def symmetric_index(h: int, w: int, i: int, j: int) -> tuple[int, int]:
    """The position of the complex-conjugate frequency of (i, j) in the fftshifted grid."""
    if not (0 <= i < h and 0 <= j < w):
        raise ValueError(f"position ({i}, {j}) outside the {h}x{w} grid")
    return _symmetric_coord(h, i), _symmetric_coord(w, j)


def representative(h: int, w: int, i: int, j: int) -> tuple[int, int]:
    """The member of the Hermitian pair {(i, j), twin} that comes first in row-major order."""
    return min((i, j), symmetric_index(h, w, i, j))


def _build(h: int, w: int, i: int, j: int) -> np.ndarray:
    """Yin's construction at the representative position (i, j), in float64."""
    si, sj = symmetric_index(h, w, i, j)
    spectrum = np.zeros((h, w), dtype=np.complex128)
    if (si, sj) == (i, j):
        # Self-conjugate (DC or Nyquist): a real coefficient already gives a real image.
        spectrum[i, j] = 1.0
    else:
        # (1 + i)/2 and its conjugate: a real image, cos - sin phase, norm 1 without rescaling.
        spectrum[i, j] = 0.5 + 0.5j
        spectrum[si, sj] = 0.5 - 0.5j
    image = np.sqrt(h * w) * np.real(np.fft.ifft2(np.fft.ifftshift(spectrum)))
    return image


def basis(h: int, w: int, i: int, j: int) -> np.ndarray:
    """The unit-L2-norm real basis image `[h, w]` float32 of shifted-grid position (i, j).

    basis(i, j) == basis(*symmetric_index(h, w, i, j)): both twins get the image built from
    the representative (the one Yin's row-major loop generates), as in the reference code.
    """
    ri, rj = representative(h, w, i, j)
    return _build(h, w, ri, rj).astype(np.float32)


def distinct_frequencies(h: int, w: int) -> np.ndarray:
    """int32 `[K, 2]`: one representative (i, j) per Hermitian pair, in row-major order.

    K = (h*w + s) / 2 where s is the number of self-conjugate positions (4 for even x even,
    2 for even x odd, 1 for odd x odd): 514 for 32 x 32.
    """
    reps = [(i, j) for i in range(h) for j in range(w) if representative(h, w, i, j) == (i, j)]
    return np.asarray(reps, dtype=np.int32).reshape(-1, 2)


def all_bases(h: int, w: int) -> np.ndarray:
    """float32 `[K, h, w]`: the basis image of every row of `distinct_frequencies(h, w)`."""
    reps = distinct_frequencies(h, w)
    return np.stack([_build(h, w, int(i), int(j)) for i, j in reps]).astype(np.float32)


def twin_positions(h: int, w: int) -> np.ndarray:
    """int32 `[K, 2]`: the twin of each representative (equal to it when self-conjugate).

    With `distinct_frequencies` this scatters K per-pair results to the full `[h, w]` grid.
    """
    reps = distinct_frequencies(h, w)
    twins = [symmetric_index(h, w, int(i), int(j)) for i, j in reps]
    return np.asarray(twins, dtype=np.int32).reshape(-1, 2)
