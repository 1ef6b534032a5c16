"""`PromptsegModel`: FiftyOne's model protocol around a promptseg segmenter, for `apply_model`.

    model = PromptsegModel(["car", "person"])                        # fixed prompts
    dataset.apply_model(model, "sam3")
    dataset.apply_model(PromptsegModel(), "sam3", prompt_field="captions")      # per-sample text prompts
    dataset.apply_model(PromptsegModel(), "masks", prompt_field="boxes")        # one object per Detections box

The model is loaded once per process and shared with the operator and the other hosts
(`promptseg.sessions.shared_segmenter`), so a second `apply_model` over the same images reuses
their embeddings.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

import fiftyone.core.models as fom

from promptseg.options import PixelOptions, SegmentOptions

from promptseg_fiftyone.convert import (
    DEFAULT_MASK_PATH_MIN_PIXELS,
    add_class_ids,
    check_output,
    exemplars_from_value,
    holds_boxes,
    label_type,
    prompts_from_value,
    to_label,
)


class PromptsegModel(fom.Model, fom.SamplesMixin):
    """Text-prompt instance segmentation (SAM 3 via promptseg) producing `fo.Detections` with masks.

    `output="segmentation"` produces one semantic `fo.Segmentation` per sample instead (pixel
    value = class id, numbered in prompt order; name them with ``dataset.mask_targets[field] =
    model.mask_targets`` after `apply_model`), and `output="polylines"` produces `fo.Polylines`.

    `prompts` are used for every sample; `prompt_field` (or ``apply_model(...,
    prompt_field=...)``) adds per-sample text prompts from a string, list of strings, or
    Classification(s) field, while a Detection(s) field makes each box one object
    (`Segmenter.segment_object`, keeping the box's label); `exemplar_field` (Detections) supplies
    example boxes for text prompts.
    `options` (a `SegmentOptions`) and the options given by name (any `SegmentOptions` field:
    threshold, mask_threshold, min_area, tile, ...) go to `Segmenter.segment`. Masks of
    images with at least `mask_path_min_pixels` pixels are written under `mask_dir` as PNG files.

    An image over the segmenter's pixel budget (``max_pixels``, `PROMPTSEG_MAX_PIXELS`), or that
    FiftyOne cannot read, fails only its sample: ``apply_model`` logs it and goes on.
    """

    def __init__(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        segmenter=None,
        prompt_field: str | None = None,
        exemplar_field: str | None = None,
        mask_dir: str | os.PathLike | None = None,
        mask_path_min_pixels: int | None = DEFAULT_MASK_PATH_MIN_PIXELS,
        output: str = "detections",
        options: SegmentOptions | None = None,
        **flat: Any,
    ) -> None:
        from promptseg.results import ensure_prompt_list
        from promptseg.sessions import shared_segmenter
        from promptseg_fiftyone.runner import check_segment_options

        fom.SamplesMixin.__init__(self)
        self.prompts = ensure_prompt_list(prompts) if prompts not in (None, [], ()) else []
        self.output = check_output(output)
        self.class_ids = add_class_ids({}, self.prompts)
        self.options = check_segment_options(options=options, **flat)  # a typo fails here, not once per sample
        self.segmenter = segmenter or shared_segmenter(model, device=device, dtype=dtype)
        self.mask_dir = mask_dir
        self.mask_path_min_pixels = mask_path_min_pixels
        self._default_fields = {
            k: v for k, v in (("prompt_field", prompt_field), ("exemplar_field", exemplar_field)) if v
        }
        self._preprocess = False

    # apply_model replaces needs_fields with its own kwargs; keep the constructor's as defaults.
    @property
    def needs_fields(self) -> dict[str, str]:
        return {**self._default_fields, **self._fields}

    @needs_fields.setter
    def needs_fields(self, fields: dict[str, str] | None) -> None:
        self._fields = dict(fields or {})

    @property
    def mask_targets(self) -> dict[int, str]:
        """{class id: prompt} of the segmentation masks predicted so far (``dataset.mask_targets``)."""
        return {value: label for label, value in self.class_ids.items()}

    @property
    def media_type(self) -> str:
        return "image"

    @property
    def ragged_batches(self) -> bool:
        return True

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self) -> bool:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        self._preprocess = value

    def predict(self, arg, sample=None):
        """Segment one image (HxWxC array, path or PIL image) with the fixed and per-sample prompts.

        When the sample's prompt field holds `fo.Detection(s)`, each box is one object instead
        (`segment_boxes`); any other value is text prompts.
        """
        from promptseg.errors import PromptError
        from promptseg.images import check_pixel_budget, load_image

        max_pixels = getattr(self.segmenter, "max_pixels", None)
        if sample is not None and hasattr(arg, "shape"):
            # apply_model decoded the sample's file itself: hold it to the budget a file read would have.
            check_pixel_budget(arg.shape[0], arg.shape[1], max_pixels, sample.filepath)
        fields = self.needs_fields
        value = sample[fields["prompt_field"]] if sample is not None and fields.get("prompt_field") else None
        if holds_boxes(value):
            self._check_box_prompts(fields)  # before the image is read
        pixels = self.options.pixels
        rgb = load_image(arg, max_pixels=max_pixels, percentiles=pixels.percentiles, channels=pixels.channels)
        if holds_boxes(value):
            return self._predict_boxes(rgb, value, sample)
        phrases = list(self.prompts)
        if value is not None:
            phrases += prompts_from_value(value, fields["prompt_field"])
        if not phrases:
            if sample is None and not fields.get("prompt_field"):
                raise PromptError("PromptsegModel has no prompts: pass prompts=[...] or prompt_field=...")
            return label_type(self.output)()
        exemplars = []
        if sample is not None and fields.get("exemplar_field"):
            exemplars = exemplars_from_value(sample[fields["exemplar_field"]], rgb.shape[:2], fields["exemplar_field"])
        # `rgb` is already RGB: the pixel options were used by load_image above
        options = self.options.replace(pixels=PixelOptions())
        result = self.segmenter.segment(rgb, phrases, options=options, exemplars=exemplars or None)
        stem = sample.id if sample is not None else uuid.uuid4().hex
        return to_label(result, self.output, phrases, self.class_ids, self.mask_dir or _default_mask_dir(), stem,
                        self.mask_path_min_pixels)

    def _check_box_prompts(self, fields: dict[str, str]) -> None:
        """A box prompt field needs the tracker head and takes no text prompts or exemplars."""
        from promptseg.errors import PromptError
        from promptseg_fiftyone.runner import require_visual_head

        require_visual_head(self.segmenter)
        if self.prompts or fields.get("exemplar_field"):
            raise PromptError(
                f"The prompt field {fields['prompt_field']!r} holds boxes, so each box is segmented as one object; "
                "text prompts and exemplar boxes do not apply to it: use a PromptsegModel without them."
            )

    def _predict_boxes(self, rgb, value, sample):
        """One detection per prompt box (`segment_boxes`); a box the core refuses is logged and left out."""
        from promptseg_fiftyone.runner import segment_boxes

        options = self.options.replace(pixels=PixelOptions())
        result, _ = segment_boxes(self.segmenter, rgb, value, options, f"Sample {sample.id} ({sample.filepath}): ")
        return to_label(result, self.output, result.prompts, self.class_ids, self.mask_dir or _default_mask_dir(),
                        sample.id, self.mask_path_min_pixels)

    def predict_all(self, args, samples=None):
        samples = samples if samples is not None else [None] * len(args)
        return [self.predict(arg, sample=sample) for arg, sample in zip(args, samples)]


def _default_mask_dir() -> str:
    import fiftyone as fo

    return os.path.join(fo.config.default_dataset_dir, "promptseg_masks", "apply_model")


class PromptsegVideoModel(fom.Model, fom.SamplesMixin):
    """Text-prompt tracking (SAM 3's video model via promptseg) for ``apply_model`` on video datasets.

        dataset.apply_model(PromptsegVideoModel(["car"]), "sam3")           # writes frames.sam3

    Each video is one `Segmenter.segment_video` call on the sample's file; the result is frame-level
    `fo.Detections` (FiftyOne's frame numbers, from 1) with instance masks and ``index`` set to the
    object id, so each object is one track. `prompt_field` adds per-sample text prompts; `stride`
    keeps every N-th frame; `new_threshold`, `options` and the options given by name (threshold,
    mask_threshold, percentiles, channels) go to `segment_video`. A model without SAM 3's tracker
    (a detector-only checkpoint) is refused here, before any video is read. A video that cannot be
    read fails only its sample: ``apply_model`` logs it and goes on.
    """

    def __init__(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        segmenter=None,
        prompt_field: str | None = None,
        stride: int = 1,
        new_threshold: float | None = None,
        mask_dir: str | os.PathLike | None = None,
        mask_path_min_pixels: int | None = DEFAULT_MASK_PATH_MIN_PIXELS,
        options: SegmentOptions | None = None,
        **flat: Any,
    ) -> None:
        from promptseg.results import ensure_prompt_list
        from promptseg.sessions import shared_segmenter
        from promptseg.video import frame_range
        from promptseg.video import check_video_options
        from promptseg_fiftyone.runner import check_segment_options
        from promptseg_fiftyone.video import require_video_model

        fom.SamplesMixin.__init__(self)
        self.prompts = ensure_prompt_list(prompts) if prompts not in (None, [], ()) else []
        self.options = check_segment_options(options=options, **flat)
        check_video_options(self.options)  # options a video does not use fail here, not once per video
        frame_range(1, None, stride)
        self.stride, self.new_threshold = stride, new_threshold
        self.segmenter = segmenter or shared_segmenter(model, device=device, dtype=dtype)
        require_video_model(self.segmenter)
        self.mask_dir = mask_dir
        self.mask_path_min_pixels = mask_path_min_pixels
        self._default_fields = {"prompt_field": prompt_field} if prompt_field else {}
        self._fields = {}

    @property
    def needs_fields(self) -> dict[str, str]:
        return {**self._default_fields, **self._fields}

    @needs_fields.setter
    def needs_fields(self, fields: dict[str, str] | None) -> None:
        self._fields = dict(fields or {})

    @property
    def media_type(self) -> str:
        return "video"

    @property
    def ragged_batches(self) -> bool:
        return False

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self) -> bool:
        return False

    def predict(self, arg, sample=None):
        """``{frame number: fo.Detections}`` for one video sample (`arg`, FiftyOne's reader, gives its path).

        The video is read by the core (PyAV) from the sample's file, frame by frame.
        """
        from promptseg.errors import PromptError
        from promptseg_fiftyone.video import frame_labels

        path = sample.filepath if sample is not None else getattr(arg, "inpath", arg)
        fields = self.needs_fields
        phrases = list(self.prompts)
        if sample is not None and fields.get("prompt_field"):
            phrases += prompts_from_value(sample[fields["prompt_field"]], fields["prompt_field"])
        if not phrases:
            if sample is None or not fields.get("prompt_field"):
                raise PromptError("PromptsegVideoModel has no prompts: pass prompts=[...] or prompt_field=...")
            return {}
        result = self.segmenter.segment_video(path, phrases, stride=self.stride, new_threshold=self.new_threshold,
                                              options=self.options)
        stem = sample.id if sample is not None else uuid.uuid4().hex
        return frame_labels(result, self.mask_dir or _default_mask_dir(), stem, self.mask_path_min_pixels)
