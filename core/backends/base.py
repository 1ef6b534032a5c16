"""Split into `promptseg.backends.protocol` (the backend interfaces) and
`promptseg.backends.sam3_common` (SAM 3 helpers); this old path still imports their names, with a
DeprecationWarning."""

from promptseg._moved import warn_moved

warn_moved(__name__, "promptseg.backends.protocol and promptseg.backends.sam3_common")

from promptseg.backends.protocol import Detections, SegmentationBackend, Tensors  # noqa: E402
from promptseg.backends.sam3_common import exemplar_inputs, sam3_embedding_spec, split_detections  # noqa: E402

__all__ = ["Detections", "SegmentationBackend", "Tensors", "exemplar_inputs", "sam3_embedding_spec", "split_detections"]
