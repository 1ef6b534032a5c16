"""Compare what FiftyOne stored with what the core returns for the same image.

A plain module with a name of its own: test modules import from here, never from `conftest`
(every test folder has one, and which of them `import conftest` finds depends on the run).
"""

from __future__ import annotations

import numpy as np

URI = "@promptseg/fiftyone/segment_with_text"


def assert_matches_core(detections, result) -> None:
    """Same instances, same order; each mask decoded by FiftyOne equals the core's, pixel for pixel."""
    height, width = result.image_size
    assert detections is not None
    assert [d.label for d in detections.detections] == [inst.label for inst in result]
    assert len(result) > 0
    for detection, inst in zip(detections.detections, result):
        assert detection.confidence == np.float32(inst.score) or detection.confidence == inst.score
        decoded = detection.to_segmentation(frame_size=(width, height), target=1).mask.astype(bool)
        # exact: the host ran the same segmenter on the same cached embedding with the same prompts
        np.testing.assert_array_equal(decoded, inst.full_mask(height, width))
        x0, y0, x1, y1 = inst.box
        assert detection.get_mask().shape == (y1 - y0, x1 - x0)


def detections_payload(detections) -> list[tuple]:
    """Everything a run writes per instance, masks included, for exact comparisons between runs."""
    return [
        (d.label, d.confidence, tuple(d.bounding_box), d.phrase, np.asarray(d.get_mask(), dtype=bool).tobytes())
        for d in detections.detections
    ]
