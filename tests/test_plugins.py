"""Backends come from pluggy hooks: built-in ones (a fixed list) and third-party ones (entry points) register the same way."""

from __future__ import annotations

import subprocess
import sys

import pytest

import promptseg
from promptseg.errors import OptionError
from promptseg.backends.protocol import BackendSpec
from promptseg.plugins import BackendRegistry, plugin_manager, registry


def test_builtin_backends_are_registered_from_the_fixed_list():
    import importlib
    import tomllib
    from pathlib import Path

    from promptseg.plugins import BUILTIN_PLUGINS

    for name, module in BUILTIN_PLUGINS:
        assert plugin_manager().get_plugin(name) is importlib.import_module(module)
    assert {"sam3", "sam3-meta"} <= set(registry().segmenters) and "openclip" in registry().scorers
    assert registry().segmenter_for("facebook/sam3").name == "sam3"
    # the entry-point group is for other packages only (the adapters' commands are such packages)
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["promptseg"]
    assert not {name for name, _ in BUILTIN_PLUGINS} & set(declared)
    assert all(not target.startswith("promptseg.") for target in declared.values())


def test_a_third_party_backend_registers_through_the_entry_point_group(tmp_path, monkeypatch):
    """An installed package's entry point is loaded after the built-ins; one named like a
    built-in does not replace it."""
    from promptseg.plugins import new_plugin_manager

    (tmp_path / "thirdparty_backend.py").write_text(
        "import promptseg\n"
        "from promptseg.backends.protocol import BackendSpec\n\n"
        "@promptseg.hookimpl\n"
        "def promptseg_register_backends(registry):\n"
        "    registry.add_segmenter(BackendSpec(name='ep-sam', load=print, accepts=lambda m: m.startswith('ep:')))\n"
    )
    info = tmp_path / "thirdparty_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[promptseg]\nep-sam = thirdparty_backend\nsam3 = thirdparty_backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    manager = new_plugin_manager()
    assert manager.get_plugin("ep-sam").__name__ == "thirdparty_backend"
    assert manager.get_plugin("sam3").__name__ == "promptseg.backends.sam3_hf"
    found = BackendRegistry()
    manager.hook.promptseg_register_backends(registry=found)
    assert found.segmenter_for("ep:weights").name == "ep-sam"
    assert found.segmenter_for("facebook/sam3").name == "sam3"


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
