"""Union-find (disjoint sets): which items end up in one group after pairwise joins.

Tiling joins the pieces of one object that neighbouring tiles saw; exclusive CLIP label sets
join overlapping masks of different labels. Both ask this one question.
"""

from __future__ import annotations


class UnionFind:
    """Items ``0..n-1``; `union` joins two groups, `find` names an item's group by its smallest item."""

    def __init__(self, count: int = 0) -> None:
        self.parent = list(range(count))

    def add(self) -> int:
        """A new item in a group of its own; returns its index."""
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def groups(self) -> list[list[int]]:
        """Every group as its items in increasing order; groups ordered by their smallest item."""
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return list(members.values())
