"""Adversarial attacks as functions and as torchattacks-style objects.

    from fastablate import attacks
    out = attacks.sparse_rs(model, x, y, k=5, queries=1000)    # an AttackOutput
    x_adv = attacks.SparseRS(model, k=5, queries=1000)(x, y)     # torchattacks' convention

Images are in [0, 1]; the model takes them as they are (normalization is part of it, or
``set_normalization_used`` on an attack object). Every attack returns, for an image it did not
fool, the image itself (``fgsm``: the stepped image, fooling or not), and stops working on an
image once it is fooled. The functions run the model as given, in eval mode with its
parameters frozen for the call; the objects attack an inference copy of it (BatchNorm folded,
channels-last). Neither changes the model, its modes or its ``requires_grad``, or leaves a
``.grad``.

- ``sparse``: white-box L0, k pixels in all their channels, gradient-guided, finished by a
  guided random search; ``sparse_rs``: black-box Sparse-RS (Croce et al. 2022);
  ``sparse_ensemble``: the two in turn, the robust accuracy of an L0 budget.
- ``noise``: the optimized-noise attack (Adam on -log p(wrong class) + lam ||delta||^2).
- ``fgsm``, ``pgd``, ``pgd_l2``: the gradient baselines (Goodfellow et al. 2015, Madry et al. 2018).
- ``ensemble``: any attacks in turn, each on what the ones before it left.
"""
from fastablate.attacks.base import Attack, AttackOutput, Trajectory, check_budget, margin
from fastablate.attacks.ensemble import SparseEnsemble, ensemble, sparse_ensemble
from fastablate.attacks.gradient import FGSM, PGD, PGDL2, fgsm, pgd, pgd_l2
from fastablate.attacks.noise import Noise, noise
from fastablate.attacks.registry import ATTACKS, REQUIRED, AttackRecord, takers
from fastablate.attacks.sparse import Sparse, sparse
from fastablate.attacks.sparse_rs import SparseRS, random_search, set_pixels, sparse_rs

__all__ = ["ATTACKS", "Attack", "AttackOutput", "AttackRecord", "FGSM", "Noise", "PGD", "PGDL2", "REQUIRED", "Sparse",
           "SparseEnsemble", "SparseRS", "Trajectory", "check_budget", "ensemble", "fgsm", "margin", "noise", "pgd",
           "pgd_l2", "random_search", "set_pixels", "sparse", "sparse_ensemble", "sparse_rs", "takers"]
