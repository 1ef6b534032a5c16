"""A model loaded after napari's OpenGL canvas must not crash the viewer (Mesa's LLVM vs triton's).

The test session imports torch and transformers before any viewer, which hides the crash, so the
user's order (viewer first, then the first click loads the model) runs in a fresh process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.gui, pytest.mark.slow]

USER_ORDER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    from promptseg_napari._gl import mesa_llvm_loaded

    viewer = napari.Viewer(show=False)
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (64, 80)).astype(np.uint8))
    print("llvm loaded:", mesa_llvm_loaded(), "triton imported:", "triton" in sys.modules, flush=True)
    from promptseg_napari._clicks import ClicksWidget

    widget = ClicksWidget(viewer)
    widget.model.value, widget.device.value = sys.argv[1], "cpu"
    widget.points_layer.add((30, 40))
    end = time.time() + 120
    while widget.busy and time.time() < end:
        QApplication.processEvents()
        time.sleep(0.02)
    print("status:", widget.status.value, flush=True)
    print("painted:", int((widget.target.value.data == 1).sum()), flush=True)
""")


def test_the_first_click_after_the_viewer_opened_loads_the_model_without_crashing(tiny_sam3_hub_dir):
    done = subprocess.run([sys.executable, "-c", USER_ORDER, str(tiny_sam3_hub_dir)],
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert "triton imported: False" in done.stdout, "the viewer opened before any model code, as for a user"
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines["status"].startswith("label 1 on the image") and int(lines["painted"]) > 0


def test_triton_is_kept_out_only_when_llvm_is_loaded_first(tmp_path, monkeypatch):
    from promptseg_napari import _gl

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libGL.so.1\n")
    assert not _gl.mesa_llvm_loaded(maps) and not _gl.mesa_llvm_loaded(tmp_path / "missing")
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    assert _gl.mesa_llvm_loaded(maps)

    monkeypatch.setattr(_gl, "mesa_llvm_loaded", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", object())  # already imported (as in this test session)
    assert not _gl.keep_triton_out_after_mesa_llvm()
    monkeypatch.delitem(sys.modules, "triton")
    assert _gl.keep_triton_out_after_mesa_llvm()
    with pytest.raises(ImportError):
        import triton  # noqa: F401
