"""Exact maximum clique: planted cliques the greedy search misses, brute force agreement, malformed input."""

from __future__ import annotations

import time

import networkx as nx
import numpy as np
import pytest

from diffaudit.attacks.cliques import (
    CliqueBudgetExceeded,
    find_largest_clique,
    k_core,
    largest_clique,
)
from diffaudit.errors import DataError


def _is_clique(adj: np.ndarray, members: np.ndarray) -> bool:
    sub = adj[np.ix_(members, members)]
    return bool((sub | np.eye(len(members), dtype=bool)).all())


def _random_graph(n: int, p: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < p, k=1)
    return upper | upper.T


def _brute_force_size(adj: np.ndarray) -> int:
    graph = nx.from_numpy_array(adj.astype(int))
    return max((len(c) for c in nx.find_cliques(graph)), default=0)


def _hub_and_pairs(num_pairs: int = 30, clique: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Vertex 0 is a hub joined to ``num_pairs`` disjoint edges; a ``clique`` is planted elsewhere."""
    n = 1 + 2 * num_pairs + clique
    adj = np.zeros((n, n), dtype=bool)
    for k in range(num_pairs):
        a, b = 1 + 2 * k, 2 + 2 * k
        adj[a, b] = adj[b, a] = True
        adj[0, [a, b]] = adj[[a, b], 0] = True
    planted = np.arange(n - clique, n)
    adj[np.ix_(planted, planted)] = True
    np.fill_diagonal(adj, False)
    return adj, planted


def test_hub_beside_planted_clique_found_exactly() -> None:
    adj, planted = _hub_and_pairs()
    # The hub has the highest degree, so a greedy search from it would return a triangle.
    assert adj.sum(axis=1).argmax() == 0
    # min_size=3 keeps the hub in the core: the search itself, not the pruning, must find the clique.
    for min_size in (10, 3, 1):
        members = largest_clique(adj, min_size=min_size)
        np.testing.assert_array_equal(members, planted)


def test_random_graphs_match_networkx() -> None:
    for seed in range(12):
        n = 20 + seed
        adj = _random_graph(n, p=0.3 + 0.04 * seed, seed=seed)
        expected = _brute_force_size(adj)
        for min_size in (1, 4, expected, expected + 2):
            result = find_largest_clique(adj, min_size=min_size)
            assert _is_clique(adj, result.members)
            assert result.members.size == expected, (seed, min_size)
            assert result.exact
            assert result.reaches_min_size == (expected >= min_size)
            assert np.all(np.diff(result.members) > 0)


def test_k_core_matches_networkx() -> None:
    adj = _random_graph(60, 0.1, seed=3)
    graph = nx.from_numpy_array(adj.astype(int))
    for k in (1, 3, 5):
        assert set(k_core(adj, k).tolist()) == set(nx.k_core(graph, k).nodes)


def test_true_diagonal_rejected_or_fixed() -> None:
    adj, planted = _hub_and_pairs()
    bad = adj.copy()
    np.fill_diagonal(bad, True)  # e.g. a thresholded distance matrix with zero self-distances
    with pytest.raises(DataError, match="diagonal"):
        largest_clique(bad)
    np.testing.assert_array_equal(largest_clique(bad, symmetrize=True), planted)


def test_asymmetric_rejected_or_fixed() -> None:
    adj, planted = _hub_and_pairs()
    bad = adj.copy()
    i, j = planted[0], planted[1]
    bad[i, j] = False
    with pytest.raises(DataError, match=rf"not symmetric.*A\[{i},{j}\]"):
        largest_clique(bad)
    np.testing.assert_array_equal(largest_clique(bad, symmetrize=True), planted)


@pytest.mark.parametrize(
    "bad", [np.zeros((3, 4), bool), np.zeros(5, bool), np.full((3, 3), 0.5)], ids=["rect", "1d", "float"]
)
def test_malformed_input_rejected(bad: np.ndarray) -> None:
    with pytest.raises(DataError):
        largest_clique(bad)


def test_zero_one_integers_accepted_and_empty_graph() -> None:
    adj, planted = _hub_and_pairs()
    np.testing.assert_array_equal(largest_clique(adj.astype(np.uint8)), planted)
    assert largest_clique(np.zeros((0, 0), bool)).size == 0
    # No edges: the largest clique is a single vertex, below min_size.
    result = find_largest_clique(np.zeros((5, 5), bool), min_size=10)
    assert result.members.size == 1 and not result.reaches_min_size and result.core_size == 0


def test_budget_exceeded_raises_not_wrong_answer() -> None:
    adj = _random_graph(80, 0.7, seed=1)
    with pytest.raises(CliqueBudgetExceeded) as info:
        largest_clique(adj, min_size=5, max_nodes_explored=10)
    assert info.value.nodes_explored == 10
    assert _is_clique(adj, info.value.best)


def test_complete_graph_is_not_limited_by_recursion() -> None:
    n = 1100  # deeper than Python's default recursion limit
    adj = ~np.eye(n, dtype=bool)
    np.testing.assert_array_equal(largest_clique(adj), np.arange(n))


def test_sparse_500_nodes_fast() -> None:
    adj = _random_graph(500, 0.02, seed=0)
    planted = np.random.default_rng(1).choice(500, 12, replace=False)
    adj[np.ix_(planted, planted)] = True
    np.fill_diagonal(adj, False)
    start = time.perf_counter()
    members = largest_clique(adj)
    no_hit = find_largest_clique(_random_graph(500, 0.02, seed=2), min_size=10)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(members, np.sort(planted))
    assert not no_hit.reaches_min_size and no_hit.exact and no_hit.members.size >= 2
    assert elapsed < 1.0, elapsed
