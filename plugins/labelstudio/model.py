"""`PromptsegMLBackend`: the ML backend's model class, with Label Studio's ``setup``/``predict`` shape.

One instance per process holds the segmenter (model weights and embedding caches, from
`promptseg.sessions.shared_segmenter`) and each project's settings from ``/setup``. A second
prompt on an image reuses its cached embedding, so interactive prompts after the first cost only
the prompt decoder. A video task runs `Segmenter.segment_video` once with every prompt and gets one
``videorectangle`` track per object (`promptseg_labelstudio.video`). The old name `PromptsegModel`
still imports, with a `DeprecationWarning`.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptseg.errors import ImageError, OptionError, PromptsegError
from promptseg.options import SegmentOptions, check_names
from promptseg_labelstudio.clicks import Clicks, clicks_in
from promptseg_labelstudio.config import BackendConfig, check_base_url
from promptseg_labelstudio.fetch import ImageFetcher, LabelStudioSource, host_entry
from promptseg_labelstudio.labeling import LabelingPlan, PromptMatchError, parse_labeling_config
from promptseg_labelstudio.regions import regions_for
from promptseg_labelstudio.shared_settings import SharedProjectSettings
from promptseg_labelstudio.video import (
    VIDEO_PARAMS,
    VideoSettings,
    label_studio_rate,
    read_timing,
    track_regions,
    video_settings,
)

logger = logging.getLogger(__name__)

POLYGON_TOLERANCE = "polygon_tolerance"
"""The one extra param that is not a `SegmentOptions` field: how far (pixels) polygon outlines may
simplify a contour (0 keeps every vertex)."""
SETUP_HOST_REFUSED = (
    "a host named by an unauthenticated /setup never receives a token: set LABEL_STUDIO_URL, or allow "
    "/setup to name the host by turning on basic auth (BASIC_AUTH_USER, BASIC_AUTH_PASS) or setting "
    "PROMPTSEG_TRUST_SETUP_HOST=1 (--trust-setup-host)"
)


@dataclass
class ProjectSettings:
    """What ``/setup`` told us about one project.

    `hostname` is kept only when the backend may take the Label Studio host from ``/setup``;
    otherwise it is `refused_hostname`, remembered for the error message. `options` are the
    backend's defaults with the project's extra params on top (None: the backend's defaults);
    `video` the extra params that pick a video's frames.
    """

    hostname: str | None = None
    access_token: str | None = None
    options: SegmentOptions | None = None
    polygon_tolerance: float = 0.0
    refused_hostname: str | None = None
    video: VideoSettings = field(default_factory=VideoSettings)


class PromptsegMLBackend:
    """Pre-annotates images with promptseg: label names (or hints) in batch; typed prompts, clicks and
    boxes interactively."""

    def __init__(self, config: BackendConfig | None = None, segmenter: Any = None) -> None:
        import promptseg
        from promptseg.sessions import shared_segmenter

        self.config = config or BackendConfig.from_env()
        self.segmenter = segmenter or shared_segmenter(
            self.config.model, device=self.config.device, dtype=self.config.dtype, cache_dir=self.config.cache_dir,
        )
        name = Path(str(self.segmenter.model_name).rstrip("/")).name or "model"
        self.model_version = f"promptseg-{promptseg.__version__}-{name}"
        self._projects: dict[str, ProjectSettings] = {}
        self._lock = threading.Lock()
        self._fetchers: dict[LabelStudioSource | None, ImageFetcher] = {}
        folder = self.config.projects_dir
        self._shared = SharedProjectSettings(folder) if folder else None
        self._seen: dict[str, tuple[int, int]] = {}  # version of each shared settings file when last read
        if self.config.api_key and not self.config.label_studio_url:
            logger.warning("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the key is only ever sent "
                           "to LABEL_STUDIO_URL, so it is not used. Set LABEL_STUDIO_URL to Label Studio's address.")
        _import_sdk_parts()

    # -- Label Studio's calls ---------------------------------------------------------------
    def setup(self, project: str, schema: str, hostname: str | None = None,
              access_token: str | None = None, extra_params: Any = None) -> dict:
        """Check the project's config and remember its host (if trusted), token and extra params.

        With a shared settings folder (several workers), the other workers see them too.
        """
        settings = self._project_settings(schema, hostname, access_token, extra_params)
        key = _project_key(project)
        with self._lock:
            self._projects[key] = settings
            if self._shared is not None:
                inputs = {"schema": schema, "hostname": hostname, "access_token": access_token,
                          "extra_params": extra_params}
                self._seen[key] = self._shared.write(key, inputs)
        return {"model_version": self.model_version}

    def _project_settings(self, schema: str, hostname: str | None, access_token: str | None,
                          extra_params: Any) -> ProjectSettings:
        plan = parse_labeling_config(schema)
        options, tolerance, video = self._project_options(extra_params)
        if plan.media == "video":
            from promptseg.video import check_video_options

            self.segmenter.require_video()
            check_video_options(options)
        settings = ProjectSettings(access_token=access_token or None, options=options, polygon_tolerance=tolerance,
                                   video=video)
        if hostname:
            hostname = check_base_url(hostname, "The hostname sent by /setup")
            configured = self.config.label_studio_url
            if configured:
                if host_entry(configured) != host_entry(hostname):
                    logger.warning("Ignoring /setup hostname %s: LABEL_STUDIO_URL pins %s", hostname, configured)
            elif self.config.setup_may_name_host:
                settings.hostname = hostname
            else:
                logger.warning("Ignoring /setup hostname %s: %s", hostname, SETUP_HOST_REFUSED)
                settings.refused_hostname = hostname
        return settings

    def predict(self, tasks: list[dict], label_config: str, project: str | None = None,
                context: dict | None = None) -> list[dict]:
        """One prediction per task, in order; a task that fails gets ``{"error": ...}`` instead."""
        plan = parse_labeling_config(label_config)
        settings = self._settings(project)
        options = settings.options or self.config.segment_options
        tolerance = settings.polygon_tolerance
        fetcher = self._fetcher(settings)
        hint = self._no_source_hint(settings)
        typed = typed_prompt(context, plan) if context else None
        predictions = []
        for task in tasks:
            task_id = task.get("id") if isinstance(task, dict) else None
            try:
                predictions.append(self._predict_task(task, plan, fetcher, hint, options, tolerance, typed, context,
                                                      settings.video))
            except PromptsegError as exc:
                logger.warning("Task %s: %s", task_id, exc)
                predictions.append(self._failed(task_id, str(exc)))
            except Exception as exc:  # one broken task must not fail its neighbours or the server
                logger.exception("Task %s failed unexpectedly", task_id)
                predictions.append(self._failed(task_id, f"unexpected {type(exc).__name__}: {exc}"))
        return predictions

    # -- helpers ------------------------------------------------------------------------------
    def _failed(self, task_id: Any, message: str) -> dict:
        """A failed task: no ``result`` key, so Label Studio logs it and stores no empty prediction."""
        return {"error": f"task {task_id}: {message}", "task": task_id, "model_version": self.model_version}

    def _predict_task(self, task, plan: LabelingPlan, fetcher, hint, options, tolerance, typed, context,
                      video: VideoSettings) -> dict:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise ImageError("A task must be an object with a 'data' object.")
        reference = task["data"].get(plan.value_key)
        if reference is None:
            tag = "Video" if plan.media == "video" else "Image"
            raise ImageError(f"The task has no {plan.value_key!r} field, which the labeling config's <{tag}> reads.")
        clicks = clicks_in(context, plan.image_name) if context and plan.media == "image" else None
        if clicks is not None:
            return self._predict_object(task, reference, plan, fetcher, hint, options, tolerance, clicks)
        phrases, label_of = _prompts(plan, typed, context)
        if plan.media == "video":
            return self._predict_video(task, reference, plan, fetcher, hint, options, video, phrases, label_of)
        with fetcher.local_image(reference, task.get("id"), hint) as path:
            result = self.segmenter.segment(path, phrases, options=options)
        regions = regions_for(result, plan.outputs, label_of, tolerance)
        scores = [inst.score for inst in result.instances]
        return {
            "result": regions,
            "score": float(max(scores)) if scores else 0.0,
            "model_version": self.model_version,
        }

    def _predict_object(self, task, reference, plan: LabelingPlan, fetcher, hint, options, tolerance,
                        clicks: Clicks) -> dict:
        """One object from the context's clicks and box, as a brush (or polygon) region of their label.

        Percentages become pixels of the image as the core loads it; the cached embedding of the
        image (from text prompts or earlier clicks) answers the clicks without the image encoder.
        """
        label = plan.label_for_clicks(clicks.label)
        with fetcher.local_image(reference, task.get("id"), hint) as path:
            rgb = self.segmenter.load(path, options.pixels)
        height, width = rgb.shape[:2]
        result = self.segmenter.segment_object(rgb, **clicks.in_pixels(height, width), options=options)
        regions = regions_for(result, plan.object_outputs(), lambda inst: label, tolerance)
        return {"result": regions, "score": float(result.instances[0].score) if len(result) else 0.0,
                "model_version": self.model_version}

    def _predict_video(self, task, reference, plan: LabelingPlan, fetcher, hint, options, video: VideoSettings,
                       phrases, label_of) -> dict:
        """Every object the prompts name, tracked through the video: one ``videorectangle`` region each.

        The video downloads under the video limits; the frames to segment (after the project's
        `frames` and `stride`) must not exceed ``max_video_frames``, checked before any is read.
        """
        from promptseg.video import frame_range

        config = self.config
        with fetcher.local_image(reference, task.get("id"), hint, config.video_download_limits) as path:
            timing = read_timing(path)
            count = len(frame_range(timing.frame_count, video.frames, video.stride))
            if count > config.max_video_frames:
                raise OptionError(
                    f"The video has {count:,} frames to segment, over the limit of {config.max_video_frames:,} per task "
                    "(PROMPTSEG_MAX_VIDEO_FRAMES): set a 'stride' or a 'frames' range in the project's extra params, "
                    "or raise the limit."
                )
            result = self.segmenter.segment_video(path, phrases, frames=video.frames, stride=video.stride,
                                                  new_threshold=video.new_threshold, options=options)
        rate = label_studio_rate(plan.frame_rate, task["data"])
        regions = track_regions(result, plan.outputs[0], label_of, timing, rate)
        return {"result": regions, "score": max((r["score"] for r in regions), default=0.0),
                "model_version": self.model_version}

    def _settings(self, project: str | None) -> ProjectSettings:
        """The project's settings, reloaded first when another worker got a newer /setup."""
        key = _project_key(project)
        with self._lock:
            changed = self._shared.read_if_changed(key, self._seen.get(key)) if self._shared is not None else None
            if changed is not None:
                self._seen[key], inputs = changed
                try:
                    self._projects[key] = self._project_settings(**inputs)
                except PromptsegError as exc:
                    logger.warning("Ignoring the shared settings of project %s: %s", key, exc)
            return self._projects.get(key) or ProjectSettings()

    def _source(self, settings: ProjectSettings) -> LabelStudioSource | None:
        """Where Label Studio files come from, with the token that may go there.

        ``LABEL_STUDIO_API_KEY`` goes only to ``LABEL_STUDIO_URL``; a host from ``/setup`` (kept
        only when trusted) gets only the token of that same ``/setup``.
        """
        if self.config.label_studio_url:
            return LabelStudioSource(self.config.label_studio_url, self.config.api_key or settings.access_token)
        if settings.hostname:
            return LabelStudioSource(settings.hostname, settings.access_token)
        return None

    def _no_source_hint(self, settings: ProjectSettings) -> str:
        """What to set so that Label Studio files can be fetched."""
        if self.config.label_studio_url:
            return ("set LABEL_STUDIO_API_KEY for the backend (a Label Studio personal access token, or a legacy "
                    "token).")
        hint = "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the backend"
        if self.config.api_key:
            hint += " (LABEL_STUDIO_API_KEY is only ever sent to LABEL_STUDIO_URL, which is unset)"
        if settings.refused_hostname:
            hint += f". /setup named {settings.refused_hostname}, but {SETUP_HOST_REFUSED}"
        elif settings.hostname:
            hint += " (Label Studio sent no token with /setup)"
        return hint + "."

    def _fetcher(self, settings: ProjectSettings) -> ImageFetcher:
        source = self._source(settings)
        with self._lock:
            fetcher = self._fetchers.get(source)
            if fetcher is None:
                config = self.config
                fetcher = ImageFetcher(source, config.allowed_hosts, config.document_root, config.download_dir,
                                       config.download_limits)
                self._fetchers[source] = fetcher
            return fetcher

    def _project_options(self, extra: Any) -> tuple[SegmentOptions, float, VideoSettings]:
        """A project's options, polygon tolerance and video settings from its extra params (a JSON object).

        Every `SegmentOptions` field may be set there, by its flat name; the core checks names and
        values (`OptionError`, answered 422 by ``/setup``). Unset ones keep the backend's defaults.
        `stride`, `frames` and `new_threshold` pick a video's frames and new objects.
        """
        if extra in (None, ""):
            extra = {}
        if isinstance(extra, str):
            import json

            try:
                extra = json.loads(extra)
            except ValueError:
                raise OptionError(f"Extra params must be a JSON object, got {extra!r}.") from None
        if not isinstance(extra, dict):
            raise OptionError(f"Extra params must be a JSON object such as {{\"threshold\": 0.3}}, got {extra!r}.")
        flat = dict(extra)
        video = video_settings(flat)
        tolerance = flat.pop(POLYGON_TOLERANCE, None)
        tolerance = 0.0 if tolerance is None else tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
            raise OptionError(f"Extra param 'polygon_tolerance' must be a number >= 0 (pixels; 0 keeps every contour "
                              f"vertex), got {tolerance!r}.")
        try:
            check_names(flat)
        except OptionError as exc:
            raise OptionError(f"{exc} Extra params also take {POLYGON_TOLERANCE!r} (pixels) and, for videos, "
                              f"{', '.join(map(repr, VIDEO_PARAMS))}.") from None
        options = self.config.segment_options.replace(**flat)
        if options.clip.asked and getattr(self.segmenter, "clip", None) is None:
            raise OptionError(f"Extra params {', '.join(options.clip.asked)} need a CLIP model, which this backend "
                              "does not load: remove them from the project's extra params.")
        return options, float(tolerance), video


def _prompts(plan: LabelingPlan, typed: str | None, context: dict | None):
    """The phrases to segment and how an instance's phrase maps back to a label: the typed prompt
    in an interactive request, else every label's prompt."""
    if context:
        if typed is None:
            raise PromptMatchError(
                "Interactive request without a typed prompt: type what to segment in the "
                + (f"TextArea {plan.textareas[0]!r}" if plan.textareas else "prompt TextArea (add one to the config)")
            )
        label, phrase = plan.label_for_prompt(typed)
        return [phrase], lambda inst: label
    phrases, phrase_to_label = plan.batch_prompts()
    return phrases, lambda inst: phrase_to_label.get(inst.label)


def typed_prompt(context: dict, plan: LabelingPlan) -> str | None:
    """The text typed in the config's TextArea (the last one), from an interactive request's context."""
    if not isinstance(context, dict):
        return None
    texts = []
    for item in context.get("result") or []:
        if not isinstance(item, dict) or str(item.get("type", "")).lower() != "textarea":
            continue
        if plan.textareas and item.get("from_name") not in plan.textareas:
            continue
        value = (item.get("value") or {}).get("text")
        if isinstance(value, str):
            value = [value]
        texts += [t for t in value or [] if isinstance(t, str) and t.strip()]
    return texts[-1] if texts else None


def _project_key(project: Any) -> str:
    """Label Studio sends ``"<id>.<created timestamp>"``: the id part names the project."""
    return str(project).split(".", 1)[0] if project is not None else ""


def __getattr__(name: str):
    if name == "PromptsegModel":
        warnings.warn("promptseg_labelstudio's PromptsegModel is now PromptsegMLBackend: import that name.",
                      DeprecationWarning, stacklevel=2)
        return PromptsegMLBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _import_sdk_parts() -> None:
    """Import the SDK's config parser and brush codec now, not on the first request.

    They take seconds to import, and Label Studio gives ``/setup`` only 3 s (ML_TIMEOUT_SETUP)
    before it declares the backend broken.
    """
    import label_studio_sdk.converter.brush  # noqa: F401
    import label_studio_sdk.label_interface  # noqa: F401
