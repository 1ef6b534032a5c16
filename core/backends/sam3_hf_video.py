"""SAM 3's video model (``Sam3VideoModel``) on the transformers backend's loaded modules and cached embeddings.

The hub checkpoint holds a detector, a tracker and one ViT trunk. The transformers backend already
holds the detector (``Sam3Model``), the tracker's neck and the trunk; the video model is built around
them, so only the tracker's video heads (memory attention, memory encoder, mask decoder, prompt
encoder) are loaded on top, once, when a video is first segmented: the trunk is never loaded twice.

Each frame's image features come from the core's embedding cache: the detector's FPN levels
(``fpn_i``) and the tracker's levels (``tracker_i``) that `Sam3Backend.encode_image` computes on one
trunk run. The video model asks for them in two places (``detector_model.get_vision_features`` and
``get_vision_features_for_tracker``); both are answered from the embedding handed to `VideoTracker.step`,
so a second concept on the same video runs no image encoder. Everything else is transformers' own
streaming inference (``Sam3VideoInferenceSession``, detection-tracking association, memories).

The session keeps every past frame's memory by default; a tracker only ever reads the last
``max(num_maskmem, max_object_pointers_in_encoder)`` frames (16 in the released config), so older
per-frame outputs are dropped as the video streams: memory stays flat however long the video is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from promptseg.backends.sam3_common import refuse_partial_load
from promptseg.errors import ModelLoadError
from promptseg.placement import move_plain_tensors

logger = logging.getLogger(__name__)

VIDEO_HELP = (
    "Segmenting a video needs SAM 3's tracker, which this checkpoint does not have (it holds the text "
    "detector only, as Sam3Model.save_pretrained writes it). Load the full facebook/sam3 checkpoint "
    "(or a directory saved from Sam3VideoModel) to use segment_video."
)
TEXT_LENGTH = 32
_PLACEHOLDER_FRAME = torch.zeros(3, 1, 1)
"""What the session stores as each frame (one shared tensor): the model reads features from the cache,
never pixels, but counts the frames seen so far (it spaces object pointers in time by that count)."""


@dataclass
class TrackedFrame:
    """One frame's objects as the video model returns them, before post-processing.

    `mask_logits` is ``(N, h, w)`` at the tracker's mask resolution, one row per object id;
    `scores` the detection score kept for each object, `tracker_scores` the tracker's own
    (0 for an object the tracker has not followed yet); `prompt_ids` index `phrases`; `hidden` the ids
    transformers' post-processing hides on this frame (suppressed, or removed while starting up).
    """

    object_ids: list[int]
    mask_logits: torch.Tensor
    scores: list[float]
    tracker_scores: list[float]
    prompt_ids: list[int]
    hidden: set[int]


class _CachedDetector(torch.nn.Module):
    """SAM 3's detector as the video model calls it, its vision features read from the frame's embedding."""

    def __init__(self, backend) -> None:
        super().__init__()
        self.model = backend.model
        self._position = backend.position_encoding
        self.embedding: dict[str, torch.Tensor] | None = None

    def get_vision_features(self, pixel_values=None, **_):
        levels = [self.embedding[f"fpn_{i}"] for i in range(sum(k.startswith("fpn_") for k in self.embedding))]
        positions = [self._position(level) for level in levels]
        tracker = [self.embedding[f"tracker_{i}"] for i in range(3)]
        # forward drops the last FPN level, which the cache does not keep: a None stands in for it
        return SimpleNamespace(fpn_hidden_states=(*levels, None), fpn_position_encoding=(*positions, None),
                               hidden_states=None, attentions=None,
                               tracker_levels=tracker)

    def get_text_features(self, **kwargs):
        return self.model.get_text_features(**kwargs)

    def forward(self, **kwargs):
        return self.model(**kwargs)


def _cached_video_model_class():
    from transformers import Sam3VideoModel

    class CachedSam3VideoModel(Sam3VideoModel):
        """``Sam3VideoModel`` whose tracker features are the cached ``tracker_i`` levels."""

        def get_vision_features_for_tracker(self, vision_embeds):
            levels = vision_embeds.tracker_levels
            width = self.tracker_neck.config.fpn_hidden_size  # positions are those of the neck's output
            positions = [
                self.tracker_neck.position_encoding((1, width, *level.shape[-2:]), level.device, level.dtype)
                for level in levels
            ]
            return ([level.flatten(2).permute(2, 0, 1) for level in levels],
                    [position.flatten(2).permute(2, 0, 1) for position in positions])

    return CachedSam3VideoModel


def load_video_model(backend, directory: Path):
    """The video model around `backend`'s detector, trunk and tracker neck; the tracker's video heads
    loaded from `directory`, every weight, strictly."""
    from transformers import Sam3TrackerVideoModel, Sam3VideoConfig
    from transformers.utils import logging as hf_logging

    config = json.loads((directory / "config.json").read_text())
    if backend.tracker is None or not config.get("tracker_config"):
        raise ModelLoadError(VIDEO_HELP)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the trunk's and neck's keys are expected to be left out here
    try:
        heads, info = Sam3TrackerVideoModel.from_pretrained(
            directory, remove_vision_encoder=True, dtype=backend.dtype, output_loading_info=True
        )
    except Exception as exc:
        raise ModelLoadError(
            f"Cannot load SAM 3's video tracker weights from {directory}: {exc}. The checkpoint may be "
            "truncated; download it again."
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    refuse_partial_load(info, directory, "video tracker")
    with torch.device("meta"):  # its own detector, trunk and neck are replaced below: never allocated
        video = _cached_video_model_class()(Sam3VideoConfig.from_pretrained(directory))
    video.detector_model = _CachedDetector(backend)
    video.tracker_model = heads.to(backend.device).eval()
    move_plain_tensors(video.tracker_model, backend.device)  # caches kept as plain attributes, which .to() skips
    video.tracker_neck = backend.tracker.vision_encoder.neck
    on_meta = [name for name, tensor in [*video.named_parameters(), *video.named_buffers()] if tensor.is_meta]
    if on_meta and backend.device.type != "meta":  # a backend on the meta device has nothing but meta tensors
        raise ModelLoadError(f"SAM 3's video model has tensors no checkpoint part filled: {on_meta[:5]}.")
    return video.eval()


class VideoTracker:
    """One video's streaming state: the prompts, then one frame at a time (`step`)."""

    def __init__(self, video_model, tokenizer, phrases: list[str], frame_size: tuple[int, int],
                 threshold: float, device: torch.device, dtype: torch.dtype,
                 new_threshold: float | None = None) -> None:
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        self.model = video_model
        config = video_model.config
        # by default the model's own ratio between keeping a detection and starting a new object (0.5 and 0.7)
        self.model.score_threshold_detection = threshold
        self.model.new_det_thresh = new_threshold if new_threshold is not None else min(
            1.0, threshold * config.new_det_thresh / config.score_threshold_detection)
        self.session = Sam3VideoInferenceSession(
            video_height=frame_size[0], video_width=frame_size[1], inference_device=device,
            inference_state_device=device, video_storage_device=device, dtype=dtype,
        )
        for phrase in phrases:
            prompt_id = self.session.add_prompt(phrase)
            tokens = tokenizer(phrase, return_tensors="pt", padding="max_length", max_length=TEXT_LENGTH,
                               truncation=True).to(device)
            self.session.prompt_input_ids[prompt_id] = tokens["input_ids"]
            self.session.prompt_attention_masks[prompt_id] = tokens["attention_mask"]
        tracker = config.tracker_config
        self.memory_frames = max(tracker.num_maskmem, tracker.max_object_pointers_in_encoder)
        self.frame_index = 0

    def step(self, embedding: dict[str, torch.Tensor]) -> TrackedFrame:
        """Track the next frame from its cached embedding (see the module docstring)."""
        index = self.frame_index
        self.model.detector_model.embedding = embedding
        try:
            out = self.model(inference_session=self.session, frame=_PLACEHOLDER_FRAME, frame_idx=index)
        finally:
            self.model.detector_model.embedding = None
        self._forget_before(index - self.memory_frames)
        self.frame_index += 1
        ids = sorted(out.obj_id_to_mask)
        masks = (torch.cat([out.obj_id_to_mask[i] for i in ids]).float() if ids
                 else torch.zeros(0, 1, 1))
        hidden = set(out.suppressed_obj_ids or ()) | set(self.session.hotstart_removed_obj_ids)
        return TrackedFrame(
            object_ids=ids, mask_logits=masks,
            scores=[float(out.obj_id_to_score[i]) for i in ids],
            tracker_scores=[float(out.obj_id_to_tracker_score.get(i, 0.0)) for i in ids],
            prompt_ids=[int(self.session.obj_id_to_prompt_id[i]) for i in ids], hidden=hidden,
        )

    def _forget_before(self, oldest: int) -> None:
        """Drop tracked-frame outputs the tracker will not read again (older than its memory window)."""
        if oldest < 0:
            return
        for outputs in self.session.output_dict_per_obj.values():
            stale = [frame for frame in outputs["non_cond_frame_outputs"] if frame < oldest]
            for frame in stale:
                del outputs["non_cond_frame_outputs"][frame]
