"""The one union-find tiling and exclusive CLIP label sets both group with."""

from promptseg.unionfind import UnionFind


def test_joined_items_form_groups_ordered_by_their_smallest_item():
    groups = UnionFind(6)
    groups.union(4, 1)
    groups.union(5, 3)
    groups.union(3, 1)
    assert groups.groups() == [[0], [1, 3, 4, 5], [2]]
    assert {groups.find(i) for i in (1, 3, 4, 5)} == {1}


def test_items_added_one_by_one_join_like_items_given_at_once():
    grown = UnionFind()
    assert [grown.add() for _ in range(4)] == [0, 1, 2, 3]
    grown.union(3, 0)
    grown.union(2, 2)
    assert grown.groups() == [[0, 3], [1], [2]]
