"""`stray_tensors` finds what `Module.to` leaves behind, and `move_plain_tensors` moves it.

The `meta` device stands in for a GPU: moving a model there and looking for anything still on the
CPU finds the same mistakes a CUDA or MPS device would, without one.
"""

from __future__ import annotations

import torch
from torch import nn

from promptseg.placement import move_plain_tensors, stray_tensors


class Cached(nn.Module):
    """A layer with the kinds of cache SAM 3's code keeps: plain tensors, in a tuple and a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(2))
        self.coords = (torch.zeros(3), torch.ones(3))
        self.cache = {(4, 4): torch.zeros(4, 4)}
        self.steps = 3  # not a tensor: left as it is


def test_stray_tensors_names_each_plain_tensor_left_behind():
    model = nn.Sequential(Cached()).to("meta")
    assert sorted(stray_tensors(model, "meta")) == [
        "attribute 0.cache[(4, 4)] on cpu",
        "attribute 0.coords[0] on cpu",
        "attribute 0.coords[1] on cpu",
    ]


def test_stray_tensors_reports_parameters_and_buffers_off_the_device():
    model = Cached()
    strays = stray_tensors(model, "meta")
    assert "parameter linear.weight on cpu" in strays and "buffer scale on cpu" in strays
    assert stray_tensors(model, "cpu") == []


def test_move_plain_tensors_moves_caches_and_keeps_their_shape():
    model = nn.Sequential(Cached()).to("meta")
    assert move_plain_tensors(model, "meta") == 2  # the tuple and the dict
    assert stray_tensors(model, "meta") == []
    layer = model[0]
    assert isinstance(layer.coords, tuple) and list(layer.cache) == [(4, 4)]
    assert layer.cache[(4, 4)].shape == (4, 4) and layer.steps == 3
    assert move_plain_tensors(model, "meta") == 0
