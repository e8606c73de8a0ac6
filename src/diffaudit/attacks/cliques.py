"""Exact maximum clique of a "these generations look alike" graph (Carlini et al. 2023, Sec. 4 step 4).

A prompt is flagged as memorized when the largest clique among its generations has at least ``min_size``
(10 in the paper) members. A greedy search started at the highest-degree vertex misses real cliques (a hub
joined to many disjoint pairs beats a planted 10-clique on degree), so this module searches exactly:

1. prune to the ``(min_size - 1)``-core (repeatedly drop vertices of degree < ``min_size - 1``): every
   clique of ``min_size`` members lies inside it, and on the sparse graphs of real audits it is usually
   empty or tiny;
2. run a branch-and-bound maximum-clique search (Tomita's MCQ: greedy colouring gives an upper bound) on the
   core, over Python-int bitsets, with a budget on the number of search nodes. Running out of budget raises
   :class:`CliqueBudgetExceeded` rather than returning a clique that might not be the largest.

When no clique reaches ``min_size`` the verdict ("not memorized") is already exact; the clique returned is
then the largest one of the whole, unpruned graph found by the same search under a small budget
(:data:`FALLBACK_NODES`). It is exact when that search completes (``CliqueResult.exact``), otherwise a maximal
clique known to be smaller than ``min_size``: good enough for ranking, and never mistaken for a hit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffaudit.errors import DataError, DiffauditError

#: Default budget of branch-and-bound nodes for the search inside the core.
DEFAULT_MAX_NODES = 1_000_000
#: Budget of the search on the unpruned graph, run only when no clique reaches ``min_size``.
FALLBACK_NODES = 20_000


class CliqueBudgetExceeded(DiffauditError):
    """The exact search ran out of its node budget; ``best`` holds the largest clique seen so far."""

    def __init__(self, message: str, best: np.ndarray, nodes_explored: int) -> None:
        super().__init__(message)
        self.best = best
        self.nodes_explored = nodes_explored


@dataclass(frozen=True)
class CliqueResult:
    """Outcome of :func:`find_largest_clique`.

    Attributes:
        members: sorted ``int64`` vertex indices ``(k,)`` of the clique.
        exact: True when ``members`` is proven to be a maximum clique of the whole graph.
        reaches_min_size: ``len(members) >= min_size`` (always exact, whatever ``exact`` says).
        core_size: vertices left after pruning to the ``(min_size - 1)``-core.
        nodes_explored: branch-and-bound nodes visited in total.
    """

    members: np.ndarray
    exact: bool
    reaches_min_size: bool
    core_size: int
    nodes_explored: int


def validate_adjacency(adjacency: np.ndarray, symmetrize: bool = False) -> np.ndarray:
    """Check (or, with ``symmetrize``, repair) an adjacency matrix and return it as ``bool`` ``(N, N)``.

    A true diagonal or an asymmetric matrix is a bug upstream (a distance matrix with self-distances, or a
    one-sided threshold); it is rejected with :class:`DataError` unless ``symmetrize`` asks to use
    ``A | A.T`` with a false diagonal.
    """
    arr = np.asarray(adjacency)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise DataError(f"adjacency must be a square (N, N) matrix; got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise DataError(f"adjacency must be boolean (or 0/1); got dtype {arr.dtype} with other values")
        arr = arr.astype(bool)
    if symmetrize:
        arr = arr | arr.T
        np.fill_diagonal(arr, False)
        return arr
    diag = np.flatnonzero(np.diagonal(arr))
    if diag.size:
        raise DataError(
            f"adjacency has a true diagonal at {diag.size} vertices (first: {int(diag[0])}); "
            "clear it or pass symmetrize=True"
        )
    asym = np.argwhere(arr != arr.T)
    if asym.size:
        i, j = (int(v) for v in asym[0])
        raise DataError(
            f"adjacency is not symmetric: A[{i},{j}]={bool(arr[i, j])} but A[{j},{i}]={bool(arr[j, i])} "
            f"({len(asym) // 2} such pairs); pass symmetrize=True to use A | A.T"
        )
    return arr


def k_core(adjacency: np.ndarray, k: int) -> np.ndarray:
    """Sorted ``int64`` indices of the ``k``-core: repeatedly drop vertices with fewer than ``k`` neighbours.

    ``adjacency`` must be a validated symmetric ``bool`` ``(N, N)`` matrix with a false diagonal.
    """
    alive = np.ones(adjacency.shape[0], dtype=bool)
    degree = adjacency.sum(axis=1)
    while True:
        drop = alive & (degree < k)
        if not drop.any():
            return np.flatnonzero(alive).astype(np.int64)
        alive &= ~drop
        # Dropping vertices lowers their neighbours' degrees, which may drop them in the next round.
        degree = degree - adjacency[:, drop].sum(axis=1)


class _Search:
    """Tomita-style branch and bound over bitsets; vertices relabelled by decreasing degree."""

    def __init__(self, adjacency: np.ndarray, budget: int | None) -> None:
        degree = adjacency.sum(axis=1)
        # High degree first: the colouring then packs big cliques early and the bound bites sooner.
        self.order = np.argsort(-degree, kind="stable")
        sub = adjacency[np.ix_(self.order, self.order)]
        # Bit j of nbrs[i] is set when i and j are adjacent (little-endian packing keeps index == bit).
        self.nbrs = [int.from_bytes(np.packbits(row, bitorder="little").tobytes(), "little") for row in sub]
        self.budget = budget
        self.explored = 0

    def _colour_sort(self, p: int) -> tuple[list[int], list[int]]:
        """Greedy colouring of the vertex set ``p``: vertices by colour class, and each one's colour."""
        order: list[int] = []
        colours: list[int] = []
        colour = 0
        while p:
            colour += 1
            q = p
            while q:
                v = (q & -q).bit_length() - 1
                q &= ~self.nbrs[v] & ~(1 << v)
                p &= ~(1 << v)
                order.append(v)
                colours.append(colour)
        return order, colours

    def run(self, n: int, lower: int) -> tuple[list[int], bool]:
        """Largest clique with more than ``lower`` members (``[]`` if none), and whether the search completed.

        Iterative (explicit stack): a clique of thousands of vertices cannot hit Python's recursion limit.
        """
        best: list[int] = []
        bound = lower
        r: list[int] = []
        order, colours = self._colour_sort((1 << n) - 1)
        stack = [[order, colours, len(order) - 1, (1 << n) - 1]]
        while stack:
            frame = stack[-1]
            order, colours, i, p = frame
            if i < 0 or len(r) + colours[i] <= bound:
                stack.pop()
                if stack:
                    r.pop()
                continue
            if self.budget is not None and self.explored >= self.budget:
                return self._labels(best), False
            self.explored += 1
            v = order[i]
            frame[2] = i - 1
            frame[3] = p & ~(1 << v)
            new_p = p & self.nbrs[v]
            r.append(v)
            if new_p:
                o, c = self._colour_sort(new_p)
                stack.append([o, c, len(o) - 1, new_p])
            else:
                if len(r) > bound:
                    best, bound = list(r), len(r)
                r.pop()
        return self._labels(best), True

    def _labels(self, members: list[int]) -> list[int]:
        return [int(self.order[v]) for v in members]


def find_largest_clique(
    adjacency: np.ndarray,
    min_size: int = 10,
    max_nodes_explored: int | None = DEFAULT_MAX_NODES,
    symmetrize: bool = False,
) -> CliqueResult:
    """Maximum clique of an undirected graph, with the details of how it was found.

    Args:
        adjacency: ``bool`` ``(N, N)``, symmetric, false diagonal (see :func:`validate_adjacency`).
        min_size: the clique size that matters (a memorization hit); prunes to the ``(min_size-1)``-core.
        max_nodes_explored: budget of branch-and-bound nodes inside the core (``None``: unlimited).
        symmetrize: use ``A | A.T`` with a false diagonal instead of rejecting a malformed matrix.

    Raises:
        DataError: malformed adjacency, ``min_size < 1`` or a non-positive budget.
        CliqueBudgetExceeded: the search inside the core ran out of budget before proving its answer.
    """
    if not isinstance(min_size, int | np.integer) or min_size < 1:
        raise DataError(f"min_size must be a positive integer; got {min_size!r}")
    if max_nodes_explored is not None and max_nodes_explored < 1:
        raise DataError(f"max_nodes_explored must be >= 1 or None; got {max_nodes_explored!r}")
    adj = validate_adjacency(adjacency, symmetrize=symmetrize)
    n = adj.shape[0]
    if n == 0:
        return CliqueResult(np.zeros(0, np.int64), True, False, 0, 0)

    core = k_core(adj, min_size - 1)
    explored = 0
    if core.size >= min_size:
        search = _Search(adj[np.ix_(core, core)], max_nodes_explored)
        found, complete = search.run(core.size, lower=min_size - 1)
        explored = search.explored
        members = np.sort(core[found]).astype(np.int64)
        if not complete:
            raise CliqueBudgetExceeded(
                f"maximum-clique search exceeded max_nodes_explored={max_nodes_explored} on a core of "
                f"{core.size} vertices (largest clique so far: {members.size}); raise the budget or the "
                "edge threshold",
                members,
                explored,
            )
        if members.size >= min_size:
            return CliqueResult(members, True, True, int(core.size), explored)

    # No clique reaches min_size: the verdict is exact; find the largest clique of the full graph cheaply.
    budget = FALLBACK_NODES if max_nodes_explored is None else min(FALLBACK_NODES, max_nodes_explored)
    search = _Search(adj, budget)
    found, complete = search.run(n, lower=0)
    members = np.sort(np.asarray(found, dtype=np.int64))
    return CliqueResult(members, complete, False, int(core.size), explored + search.explored)


def largest_clique(
    adjacency: np.ndarray,
    min_size: int = 10,
    max_nodes_explored: int | None = DEFAULT_MAX_NODES,
    symmetrize: bool = False,
) -> np.ndarray:
    """Sorted ``int64`` indices ``(k,)`` of a maximum clique of ``adjacency`` (``bool`` ``(N, N)``).

    Exact whenever a clique of at least ``min_size`` exists (budget overrun raises
    :class:`CliqueBudgetExceeded`). Below ``min_size`` the clique is the largest found by a cheap search of
    the unpruned graph; compare ``len(result)`` with ``min_size`` for the verdict, which is always exact. See
    :func:`find_largest_clique` for the arguments and for whether the small case was proven maximum.
    """
    return find_largest_clique(adjacency, min_size, max_nodes_explored, symmetrize).members
