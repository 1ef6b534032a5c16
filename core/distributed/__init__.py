"""Dataset-size runs over many machines: `segment_on_ray` (a Ray Data pipeline of actors that each
keep one loaded segmenter) and the compact records it streams back (`record_to_result`).

Needs the ``ray`` extra (``pip install 'promptseg[ray]'``); Ray is imported only when a run starts.
See docs/scaling.md.
"""

from __future__ import annotations

from promptseg.distributed.records import error_record, record_to_result, result_to_record
from promptseg.distributed.runner import SegmentWorker, segment_on_ray

__all__ = ["SegmentWorker", "error_record", "record_to_result", "result_to_record", "segment_on_ray"]
