"""Backends come from pluggy hooks: the built-in one and a third-party one register the same way."""

from __future__ import annotations

import subprocess
import sys

import pytest

import promptseg
from promptseg.errors import OptionError
from promptseg.plugins import BackendSpec, plugin_manager, registry


def test_builtin_backend_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="promptseg")}
    assert "sam3" in names
    assert "sam3" in registry().segmenters
    assert registry().segmenter_for("facebook/sam3").name == "sam3"


def test_a_third_party_backend_can_be_added_and_chosen(tiny_sam3_dir, rgb_image):
    from promptseg.backends import sam3_hf

    calls = []

    class ThirdParty:
        @promptseg.hookimpl
        def promptseg_register_backends(self, registry):
            def load(model, device, dtype, **options):
                calls.append(model)
                return sam3_hf.load(str(tiny_sam3_dir), device=device, dtype=dtype)

            registry.add_segmenter(BackendSpec(name="my-sam", load=load,
                                               accepts=lambda model: model.startswith("my:"), priority=10))

    plugin = ThirdParty()
    plugin_manager().register(plugin, name="third-party-test")
    registry.cache_clear()
    try:
        seg = promptseg.load_segmenter("my:weights", cache_dir=False)
        assert calls == ["my:weights"]
        assert len(seg.segment(rgb_image, "cat", threshold=0.0)) > 0
        assert promptseg.load_segmenter("x", backend="my-sam", cache_dir=False) is not None
        with pytest.raises(OptionError, match="Unknown segmentation backend 'nope'"):
            promptseg.load_segmenter("x", backend="nope", cache_dir=False)
    finally:
        plugin_manager().unregister(plugin)
        registry.cache_clear()


def test_import_is_light():
    code = "import sys, promptseg; print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'fiftyone', 'napari') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_command_line_help_does_not_load_torch():
    code = ("import sys; from promptseg.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'fiftyone', 'napari', 'flask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
