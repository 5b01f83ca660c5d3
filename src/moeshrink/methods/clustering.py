"""Clustering pieces shared by the merging methods: per-group clustering, spectral clustering, k-means."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Clusterer = Callable[[list[int], int], list[list[int]]]


def per_group(num_experts: int, groups: int, keep: int, cluster: Clusterer) -> list[list[int]]:
    """Run ``cluster(experts, k)`` inside each contiguous routing group (DeepSeek), ``keep / groups``
    clusters each, so every group survives with the same number of experts; one group otherwise."""
    size, k = num_experts // groups, keep // groups
    clusters: list[list[int]] = []
    for g in range(groups):
        clusters.extend(cluster(list(range(g * size, (g + 1) * size)), k))
    return clusters


def kmeans(points: np.ndarray, k: int, seed: int = 0, restarts: int = 8, iterations: int = 100) -> np.ndarray:
    """Labels of a k-means++ / Lloyd clustering with exactly ``k`` non-empty clusters (best of restarts)."""
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    best_labels, best_inertia = None, np.inf
    for _ in range(restarts):
        centres = [points[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min(((points[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
            probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
            centres.append(points[rng.choice(n, p=probs)])
        centres = np.array(centres)
        for _ in range(iterations):
            d2 = ((points[:, None] - centres[None]) ** 2).sum(-1)
            labels = d2.argmin(1)
            for c in range(k):  # an empty cluster takes the point farthest from its centre
                if not (labels == c).any():
                    far = d2[np.arange(n), labels].argmax()
                    labels[far] = c
                    d2[far] = 0
            new = np.array([points[labels == c].mean(0) for c in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = ((points - centres[labels]) ** 2).sum()
        if inertia < best_inertia:
            best_labels, best_inertia = labels.copy(), inertia
    return best_labels


def spectral_clusters(affinity: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Normalised spectral clustering (Ng, Jordan & Weiss): the ``k`` smallest eigenvectors of the
    symmetric normalised Laplacian, rows scaled to unit length, then k-means. Returns labels."""
    a = np.clip((affinity + affinity.T) / 2, 0, None)
    np.fill_diagonal(a, 0)
    degree = a.sum(1)
    inv_sqrt = np.where(degree > 0, 1 / np.sqrt(np.maximum(degree, 1e-12)), 0)
    laplacian = np.eye(len(a)) - inv_sqrt[:, None] * a * inv_sqrt[None]
    _, vectors = np.linalg.eigh(laplacian)
    embedding = vectors[:, :k]
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    embedding = embedding / np.where(norms > 0, norms, 1)
    return kmeans(embedding, k, seed=seed)


def labels_to_clusters(members: list[int], labels: np.ndarray) -> list[list[int]]:
    return [[members[i] for i in np.flatnonzero(labels == c)] for c in np.unique(labels)]


def cosine_matrix(profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity between the columns of ``profiles`` [T, E] -> [E, E]."""
    norms = np.linalg.norm(profiles, axis=0)
    unit = profiles / np.where(norms > 0, norms, 1)
    return unit.T @ unit


def capped_average_linkage(features: np.ndarray, k: int, cap: int) -> np.ndarray:
    """Average-linkage (UPGMA) agglomerative clustering on Euclidean distances into ``k`` clusters,
    never forming a cluster larger than ``cap``. Without a binding cap it cuts the same dendrogram as
    ``scipy.cluster.hierarchy.linkage(method="average")``. Returns labels."""
    n = features.shape[0]
    if cap * k < n:
        raise ValueError(f"{n} experts cannot form {k} clusters of at most {cap}")
    dist = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
    clusters = [[i] for i in range(n)]
    while len(clusters) > k:
        best, pair = np.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                if len(clusters[a]) + len(clusters[b]) > cap:
                    continue
                d = dist[np.ix_(clusters[a], clusters[b])].mean()
                if d < best:
                    best, pair = d, (a, b)
        if pair is None:
            raise ValueError(f"no two clusters fit under the cap of {cap} experts")
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)
    labels = np.empty(n, dtype=int)
    for c, members in enumerate(clusters):
        labels[members] = c
    return labels
