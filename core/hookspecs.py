"""Every hook promptseg calls, in one place.

Plugins implement these with ``@promptseg.hookimpl``. Built-in ones (the SAM 3 backends, the
OpenCLIP scorer) are modules named in `promptseg.plugins.BUILTIN_PLUGINS`; a third-party
package names its module in the entry-point group ``promptseg``::

    [project.entry-points.promptseg]
    mybackend = "mypackage.promptseg_backend"
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "promptseg"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def promptseg_register_backends(registry) -> None:
    """Called once, the first time promptseg needs a backend.

    Call ``registry.add_segmenter(spec)`` with a :class:`promptseg.backends.protocol.BackendSpec` for each
    segmentation backend (an image + text prompts -> masks model), and ``registry.add_scorer(spec)``
    for each image-text scorer (CLIP-like). Return nothing.
    """


@hookspec
def promptseg_add_commands(subparsers) -> None:
    """Called while the ``promptseg`` command line is built.

    Add sub-commands to the :mod:`argparse` `subparsers` object; give each a
    ``func(args) -> int`` default. Adapters use this to add ``promptseg fiftyone ...`` and
    ``promptseg labelstudio ...`` without the core importing them.
    """
