"""Structure of a collection from its φ matrix: clusters, dendrogram order, 2-D map, duplicates, outliers.

Everything works on the distance ``D = 1 − φ`` (``(N, N)``, symmetric, zero
diagonal; a pair with no module in common counts as distance 1):

- clusters: scikit-learn's agglomerative clustering, average linkage, on the
  precomputed ``D``; ``K`` given, a distance threshold, or ``auto``: the ``K``
  in ``2..min(N−1, 20)`` with the best silhouette (one cluster when ``N < 3``).
  Labels are renumbered in input order (the first adapter is in cluster 0).
- dendrogram order: the leaves of SciPy's average-linkage tree on ``D``.
- map: metric MDS of ``D`` to 2-D (SMACOF, seeded).
- near-duplicates: pairs with ``φ ≥ duplicate``.
- outliers, each with its reasons: *isolated* — the nearest neighbour's φ is
  at random-baseline level (``φ_nn ≤ μ_rand + 6 σ_rand`` for that pair);
  *norm* / *effective rank* — ``|x − median| / (1.4826 · MAD) > 3.5`` on
  ``log ‖ΔW‖`` or the effective rank (Iglewicz & Hoaglin's robust z-score)
  *and* a departure that matters: a norm off the median by more than 2×, an
  effective rank by more than 25 % (a collection of near-equal adapters has a
  tiny MAD, and its noise must not count; with MAD 0 the departure alone
  decides); *zero update* — ``‖ΔW‖ = 0``, left out of the norm statistics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .collection_aggregate import CollectionSimilarity
from .serialize import num

#: Robust z-score above which an adapter's norm or effective rank is an outlier (Iglewicz & Hoaglin 1993).
ROBUST_Z = 3.5
#: Standard deviations of the random baseline within which a nearest neighbour counts as unrelated.
RANDOM_SIGMAS = 6.0
MAX_AUTO_CLUSTERS = 20


@dataclass(frozen=True, eq=False)
class CollectionStructure:
    """Clusters (one label per adapter, input order), dendrogram order, 2-D coordinates, duplicates, outliers."""

    labels: tuple[int, ...]
    n_clusters: int
    method: str
    silhouette: float | None
    order: tuple[int, ...]
    linkage: np.ndarray
    coords: np.ndarray
    duplicates: tuple[tuple[int, int, float], ...]
    outliers: dict
    nearest: tuple[int, ...]
    nearest_phi: tuple[float, ...]

    def to_dict(self, names) -> dict:
        # reshaped: adapter indices become names (``names``), pairs and outliers become records
        return {
            "clusters": {"labels": list(self.labels), "n_clusters": self.n_clusters, "method": self.method,
                         "silhouette": num(self.silhouette)},
            "dendrogram_order": list(self.order),
            "linkage": self.linkage.tolist(),
            "coords": self.coords.tolist(),
            "near_duplicates": [{"a": names[i], "b": names[j], "phi": num(p)} for i, j, p in self.duplicates],
            "outliers": [{"adapter": names[i], "reasons": r} for i, r in self.outliers.items()],
            "nearest": [{"adapter": names[i], "nearest": names[j], "phi": num(p)}
                        for i, (j, p) in enumerate(zip(self.nearest, self.nearest_phi))],
        }


def distance_matrix(coll: CollectionSimilarity) -> np.ndarray:
    """``1 − φ`` clipped to ``[0, 1]``, symmetrized, zero diagonal; NaN (nothing shared) → 1."""
    phi = coll.phi.numpy()
    D = 1.0 - np.nan_to_num(phi, nan=0.0)
    D = np.clip(0.5 * (D + D.T), 0.0, 1.0)
    np.fill_diagonal(D, 0.0)
    return D


def collection_structure(
    coll: CollectionSimilarity,
    clusters: int | str = "auto",
    distance_threshold: float | None = None,
    duplicate: float = 0.99,
    seed: int = 0,
) -> CollectionStructure:
    """Clusters, order, map, duplicates and outliers of a collection (see the module docstring)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    N = coll.size
    D = distance_matrix(coll)
    if not 0.0 < duplicate <= 1.0:
        raise ConfigError(f"duplicate threshold {duplicate}: expected a φ in (0, 1], e.g. 0.99.")
    labels, method, sil = _clusters(D, clusters, distance_threshold)
    Z = linkage(squareform(D, checks=False), method="average") if N > 1 else np.zeros((0, 4))
    order = tuple(int(i) for i in leaves_list(Z)) if N > 1 else (0,)
    coords = _mds(D, seed)
    phi = coll.phi.numpy()
    off = np.where(np.eye(N, dtype=bool), -np.inf, np.nan_to_num(phi, nan=-np.inf))
    nearest = off.argmax(1)
    nn_phi = off[np.arange(N), nearest]
    dups = tuple((i, j, float(phi[i, j])) for i in range(N) for j in range(i + 1, N) if phi[i, j] >= duplicate)
    outliers: dict[int, list[str]] = {}
    level = coll.random_phi.numpy() + RANDOM_SIGMAS * coll.random_std.numpy()
    for i in range(N):
        if np.isfinite(nn_phi[i]) and nn_phi[i] <= level[i, nearest[i]]:
            outliers.setdefault(i, []).append(
                f"isolated: nearest neighbour φ {nn_phi[i]:.3f} is at random-baseline level "
                f"(≤ {level[i, nearest[i]]:.3f} = random mean + {RANDOM_SIGMAS:g}σ)")
    norms = coll.norms.numpy()
    for i in np.flatnonzero(norms == 0):
        outliers.setdefault(int(i), []).append("zero update: ‖ΔW‖ = 0 (an untrained or init-only adapter?)")
    live = np.flatnonzero(norms > 0)  # a zero update is reported above, not measured against the others
    for what, x, show, big in (
            ("norm", np.log(norms[live]) if len(live) else norms[live], np.exp, lambda d, med: d > np.log(2)),
            ("effective rank", coll.effective_rank.numpy()[live], lambda v: v, lambda d, med: d > 0.25 * abs(med))):
        for j, z, med in _robust_z(x, big):
            spread = f"robust z = {z:+.1f}" if z is not None else "MAD 0: the others agree exactly"
            outliers.setdefault(int(live[j]), []).append(
                f"{what} {show(x[j]):.3g} against the collection's median {show(med):.3g} ({spread})")
    return CollectionStructure(
        labels=labels, n_clusters=len(set(labels)), method=method, silhouette=sil, order=order, linkage=Z,
        coords=coords, duplicates=dups, outliers=dict(sorted(outliers.items())),
        nearest=tuple(int(j) for j in nearest), nearest_phi=tuple(float(p) for p in nn_phi),
    )


def _robust_z(x: np.ndarray, big) -> list[tuple[int, float | None, float]]:
    """``(i, z, median)`` for entries with ``|z| > ROBUST_Z`` (``z = (x − median) / (1.4826 · MAD)``)
    and ``big(|x − median|, median)``; ``z`` is None when MAD = 0 (any departure that ``big`` accepts counts)."""
    if len(x) < 3:
        return []
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    if mad == 0:
        return [(i, None, med) for i in range(len(x)) if big(abs(x[i] - med), med)]
    z = (x - med) / mad
    return [(i, float(v), med) for i, v in enumerate(z) if abs(v) > ROBUST_Z and big(abs(x[i] - med), med)]


def _renumber(labels: np.ndarray) -> tuple[int, ...]:
    """Cluster ids in order of first appearance, so the output does not depend on the library's numbering."""
    seen: dict[int, int] = {}
    return tuple(seen.setdefault(int(x), len(seen)) for x in labels)


def _clusters(D: np.ndarray, clusters: int | str, threshold: float | None) -> tuple[tuple[int, ...], str, float | None]:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    N = len(D)

    def fit(**kw) -> np.ndarray:
        return AgglomerativeClustering(metric="precomputed", linkage="average", **kw).fit_predict(D)

    def silhouette(lab) -> float | None:
        k = len(set(lab))
        return float(silhouette_score(D, lab, metric="precomputed")) if 1 < k < N else None

    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"distance threshold {threshold}: expected a 1 − φ distance in [0, 1].")
        lab = fit(n_clusters=None, distance_threshold=threshold) if N > 1 else np.zeros(1, int)
        return _renumber(lab), f"threshold {threshold:g}", silhouette(lab)
    if clusters == "auto":
        if N < 3:
            return (0,) * N, "auto (too few adapters: one cluster)", None
        best = None
        for k in range(2, min(N - 1, MAX_AUTO_CLUSTERS) + 1):
            lab = fit(n_clusters=k)
            s = silhouette(lab)
            if s is not None and (best is None or s > best[0] + 1e-12):
                best = (s, lab)
        if best is None:
            return (0,) * N, "auto", None
        return _renumber(best[1]), "auto (silhouette)", best[0]
    try:
        k = int(clusters)
    except (TypeError, ValueError):
        raise ConfigError(f"--clusters {clusters!r}: expected a number of clusters or 'auto'.") from None
    if not 1 <= k <= N:
        raise ConfigError(f"--clusters {k}: expected between 1 and the number of adapters ({N}).")
    lab = fit(n_clusters=k) if k > 1 else np.zeros(N, int)
    return _renumber(lab), f"K = {k}", silhouette(lab)


def _mds(D: np.ndarray, seed: int) -> np.ndarray:
    """2-D metric MDS of the precomputed distances, seeded; ``(N, 2)``."""
    from sklearn.manifold import MDS

    N = len(D)
    if N < 3:
        return np.array([[-0.5 * D[0, -1], 0.0], [0.5 * D[0, -1], 0.0]])[:N]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's parameter-rename FutureWarnings
        try:
            mds = MDS(n_components=2, metric="precomputed", n_init=4, init="random", random_state=seed)
        except TypeError:  # scikit-learn < 1.8 spells it `dissimilarity`
            mds = MDS(n_components=2, dissimilarity="precomputed", n_init=4, random_state=seed)
        coords = mds.fit_transform(D)
    if not np.isfinite(coords).all():
        coords = np.zeros((N, 2))
    return coords - coords.mean(0)


__all__ = ["CollectionStructure", "collection_structure", "distance_matrix"]
