"""What napari's OpenGL canvas means for the model code loaded after it, in the same process.

On Linux, Mesa's OpenGL drivers (llvmpipe, as under Xvfb, and radeonsi) load their own LLVM
library when napari opens its canvas. Triton, the GPU kernel compiler that torch and transformers
import when it is installed, carries another LLVM: loaded after Mesa's, the process crashes with
a segmentation fault (seen here with Mesa's LLVM 15 and triton 3). napari opens its canvas before
a widget loads the model, so the widgets call `keep_triton_out_after_mesa_llvm` first.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def mesa_llvm_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether an LLVM library is mapped into this process (Linux; False where there is no maps file)."""
    try:
        return "libLLVM" in maps.read_text(errors="replace")
    except OSError:
        return False


def keep_triton_out_after_mesa_llvm() -> bool:
    """Make ``import triton`` an ImportError when LLVM is already loaded and triton is not.

    torch and transformers treat triton as optional (it only compiles GPU kernels), so they load
    and run without it; without this they would crash the viewer. Returns whether triton was kept out.
    """
    if "triton" in sys.modules or not mesa_llvm_loaded():
        return False
    sys.modules["triton"] = None  # the documented way to make an import fail
    logger.info("OpenGL's LLVM is loaded in this process: triton is not imported (it would crash napari).")
    return True
