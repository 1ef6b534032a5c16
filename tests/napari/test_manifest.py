"""The npe2 plugin: a valid manifest, the contract names, and napari finding the widget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_npe2_validate_passes_with_imports():
    npe2 = Path(sys.executable).with_name("npe2")
    command = [str(npe2)] if npe2.exists() else [sys.executable, "-m", "npe2"]
    done = subprocess.run([*command, "validate", "promptseg", "--imports"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout


def test_manifest_contract():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("promptseg")
    assert manifest.name == "promptseg"
    widgets = {w.display_name: w.command for w in manifest.contributions.widgets}
    assert "Segment by text" in widgets and "Segment by clicks" in widgets
    segment_menu = manifest.contributions.menus["napari/layers/segment"]
    assert [item.command for item in segment_menu] == [widgets["Segment by text"], widgets["Segment by clicks"]]
    assert {s.key for s in manifest.contributions.sample_data} == {"nuclei", "nuclei_stack"}


def test_plugin_manager_finds_it_by_category_classifier_and_project_urls():
    """napari's plugin manager and hub list a plugin by its manifest categories and its package's
    ``Framework :: napari`` classifier, and link its home and issue pages."""
    from npe2 import PluginManifest
    from npe2.manifest.schema import Category

    manifest = PluginManifest.from_distribution("promptseg")
    assert {Category.Segmentation, Category.Annotation} <= set(manifest.categories)
    metadata = manifest.package_metadata
    assert "Framework :: napari" in metadata.classifier
    urls = dict(url.split(", ", 1) for url in metadata.project_url)
    # the labels the napari hub shows as links
    assert {"Source Code", "Bug Tracker", "Documentation", "User Support"} <= set(urls), urls


@pytest.mark.gui
@pytest.mark.slow
def test_napari_docks_the_widget_by_its_display_name(make_napari_viewer, monkeypatch, tiny_sam3_dir):
    monkeypatch.setenv("PROMPTSEG_MODEL", str(tiny_sam3_dir))
    from promptseg_napari._widget import SegmentWidget

    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("promptseg", "Segment by text")

    assert isinstance(widget, SegmentWidget)
    assert widget.model.value == str(tiny_sam3_dir), "the model defaults to PROMPTSEG_MODEL"
    from napari._app_model import get_app_model

    titles = [getattr(getattr(item, "command", None), "title", "") for item in
              get_app_model().menus.get_menu("napari/layers/segment")]
    assert any(title.startswith("Segment by text") for title in titles), titles


def test_sample_data_is_made_by_code():
    from promptseg_napari._sample_data import make_nuclei, nuclei

    (data, meta, kind), = nuclei()
    assert kind == "image" and data.dtype.name == "uint16" and data.shape == (512, 512)
    assert data.max() > 4 * data.min() > 0, "bright nuclei over a dim, non-zero background"
    assert (make_nuclei((64, 64), seed=3) == make_nuclei((64, 64), seed=3)).all()


def test_the_docs_options_table_names_every_core_option_and_the_widgets_subset():
    import re
    from pathlib import Path

    from promptseg.options import SegmentOptions
    from promptseg_napari._widget import WIDGET_OPTIONS

    text = (Path(__file__).parents[2] / "docs" / "napari.md").read_text()
    table = text[text.index("### Options"):text.index("## What you get")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert set(SegmentOptions.names()) <= {n for row in rows for n in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    shown = {n for row in rows if "not shown" not in row for n in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert shown == set(WIDGET_OPTIONS)
