"""What a project's labeling config asks for: which image, which region types, which prompts.

Parsed with label-studio-sdk's `LabelInterface`. Supported: ``BrushLabels``, ``PolygonLabels``
and ``RectangleLabels`` on an ``Image``, and a generic ``Labels`` paired with ``Brush``,
``Polygon`` or ``Rectangle`` on the same image. A ``TextArea`` on the image is the interactive
prompt box. Each label is prompted by its ``hint`` attribute when present, else its name.
``KeyPointLabels`` and ``RectangleLabels`` in an interactive request are clicks and a box for one
object, filled into the brush (or polygon) output. A ``Video`` with a ``VideoRectangle`` and
``Labels`` gets one ``videorectangle`` track per object; its ``frameRate`` (Label Studio's frame
numbering) is kept for the keyframes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from promptseg.errors import PromptsegError
from promptseg.results import normalise_prompt

GEOMETRY = {"brush": "brushlabels", "polygon": "polygonlabels", "rectangle": "rectanglelabels"}
LABELED = {v: k for k, v in GEOMETRY.items()}
VIDEO_RECTANGLE = "videorectangle"
LABELED[VIDEO_RECTANGLE] = "video rectangle"
PROMPT_ATTRIBUTES = ("hint", "prompt")
JSON_TYPES = {dict: "object", list: "list", int: "number", float: "number", bool: "boolean"}


class LabelingConfigError(PromptsegError):
    """The labeling config has nothing promptseg can fill in."""


class PromptMatchError(PromptsegError):
    """A typed prompt names none of the project's labels."""


@dataclass(frozen=True)
class Output:
    """One control to fill: regions of `result_type` (e.g. ``brushlabels``) from `from_name` on `to_name`."""

    from_name: str
    to_name: str
    result_type: str
    labels: tuple[str, ...]

    @property
    def geometry(self) -> str:
        return LABELED[self.result_type]


@dataclass(frozen=True)
class LabelingPlan:
    """The image (or video) object, the outputs on it, the prompt of each label and the prompt box (if any).

    `media` is ``"image"`` or ``"video"``; `image_name` names the object either way. For a video,
    `frame_rate` is the ``<Video frameRate>`` attribute as written (a number, ``$field``, or None).
    """

    image_name: str
    value_key: str
    outputs: tuple[Output, ...]
    prompts: dict[str, str] = field(default_factory=dict)
    textareas: tuple[str, ...] = ()
    media: str = "image"
    frame_rate: str | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.prompts)

    def batch_prompts(self) -> tuple[list[str], dict[str, str]]:
        """Prompt phrases for pre-annotation and, for each phrase, the label it fills."""
        phrase_to_label: dict[str, str] = {}
        for label, phrase in self.prompts.items():
            phrase_to_label.setdefault(normalise_prompt(phrase), label)
        return list(phrase_to_label), phrase_to_label

    def label_for_prompt(self, text: str) -> tuple[str, str]:
        """Map a typed prompt to ``(label, phrase)``.

        ``"label: description"`` picks the label explicitly; otherwise a prompt equal to a label
        or its hint, then a prompt containing a label name (longest wins), then the only label.
        """
        text = normalise_prompt(text)
        if not text:
            raise PromptMatchError("The prompt is empty: type what to segment, e.g. one of " + self._label_list())
        lowered = {label.lower(): label for label in self.prompts}
        head, sep, tail = text.partition(":")
        if sep and head.strip().lower() in lowered and tail.strip():
            return lowered[head.strip().lower()], tail.strip()
        for label, phrase in self.prompts.items():
            if text.lower() in (label.lower(), phrase.lower()):
                return label, text
        contained = [
            label for label in self.prompts
            if re.search(r"(?<!\w)" + re.escape(label.lower()) + r"(?!\w)", text.lower())
        ]
        if contained:
            return max(contained, key=len), text
        if len(self.prompts) == 1:
            return next(iter(self.prompts)), text
        raise PromptMatchError(
            f"The prompt {text!r} names none of the labels {self._label_list()}: include a label name, "
            "or type 'label: description' (e.g. 'car: red car')."
        )

    def object_outputs(self) -> tuple[Output, ...]:
        """Where one clicked object goes: the brush and polygon outputs (a rectangle control on the
        same image is then the box prompt, not an output), else the rectangle outputs."""
        shapes = tuple(o for o in self.outputs if o.geometry != "rectangle")
        return shapes or self.outputs

    def label_for_clicks(self, label: str | None) -> str:
        """The label of a clicked object: the click's (or box's) label when an output has it, else
        the only label there is."""
        labels = {lab for o in self.object_outputs() for lab in o.labels}
        if label in labels:
            return label
        if len(labels) == 1:
            return next(iter(labels))
        named = f"The click or box is labelled {label!r}, which" if label else "The click or box has no label, so it"
        raise PromptMatchError(
            f"{named} names none of the labels {sorted(labels)} of the region to fill: give the "
            "KeyPointLabels and RectangleLabels the same <Label> values as the BrushLabels (or PolygonLabels) "
            "and pick one before clicking."
        )

    def _label_list(self) -> str:
        return "[" + ", ".join(self.prompts) + "]"


def parse_labeling_config(config: str) -> LabelingPlan:
    """Read a labeling config (XML string) into a `LabelingPlan`; cached, configs repeat."""
    if config is None or (isinstance(config, str) and not config.strip()):
        raise LabelingConfigError("The request has no labeling config ('label_config' or 'schema').")
    if not isinstance(config, str):
        raise LabelingConfigError(
            f"The labeling config must be the project's XML as a string, got a JSON {JSON_TYPES.get(type(config), 'value')}: "
            "send the project's label_config as it is (e.g. '<View>...</View>')."
        )
    return _parse(config)


@lru_cache(maxsize=64)
def _parse(config: str) -> LabelingPlan:
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises lxml and its own errors alike
        raise LabelingConfigError(f"The labeling config cannot be parsed: {exc}") from exc
    images = {obj.name: obj for obj in interface.objects if obj.tag.lower() == "image"}
    videos = {obj.name: obj for obj in interface.objects if obj.tag.lower() == "video"}
    controls = list(interface.controls)
    if videos and not images:
        return _video_plan(videos, controls)
    if not images:
        raise LabelingConfigError(
            "The labeling config has no <Image> tag: promptseg segments images (and videos). "
            'Add e.g. <Image name="image" value="$image"/>, or <Video name="video" value="$video"/> with '
            '<VideoRectangle name="box" toName="video"/> and <Labels>.'
        )
    outputs: list[Output] = []
    for control in controls:
        tag = control.tag.lower()
        targets = [name for name in control.to_name or [] if name in images]
        if tag in LABELED and targets:
            outputs.append(Output(control.name, targets[0], tag, tuple(control.labels)))
        elif tag == "labels" and targets:
            for geometry in controls:
                if geometry.tag.lower() in GEOMETRY and targets[0] in (geometry.to_name or []):
                    outputs.append(Output(control.name, targets[0], GEOMETRY[geometry.tag.lower()], tuple(control.labels)))
    outputs = [o for o in outputs if o.labels]
    if not outputs:
        raise LabelingConfigError(
            "The labeling config has no BrushLabels, PolygonLabels or RectangleLabels (or Labels with "
            "Brush/Polygon/Rectangle) with at least one <Label> on an <Image>: promptseg has nothing to fill in."
        )
    image_name = outputs[0].to_name
    outputs = [o for o in outputs if o.to_name == image_name]
    value_key = _value_key(images[image_name], "Image", "image")
    names = {o.from_name for o in outputs}
    prompts = _label_prompts(c for c in controls if c.name in names)
    return LabelingPlan(image_name, value_key, tuple(outputs), prompts, _textareas(controls, image_name))


def _video_plan(videos: dict, controls: list) -> LabelingPlan:
    """The first ``VideoRectangle`` on a ``Video`` with ``Labels`` on the same video: one output
    whose labels are those of every such ``Labels`` (Label Studio puts them in ``value.labels``)."""
    for rectangle in controls:
        targets = [name for name in rectangle.to_name or [] if name in videos]
        if rectangle.tag.lower() != VIDEO_RECTANGLE or not targets:
            continue
        video_name = targets[0]
        label_controls = [c for c in controls if c.tag.lower() == "labels" and video_name in (c.to_name or [])]
        prompts = _label_prompts(label_controls)
        if not prompts:
            continue
        output = Output(rectangle.name, video_name, VIDEO_RECTANGLE, tuple(prompts))
        video = videos[video_name]
        return LabelingPlan(video_name, _value_key(video, "Video", "video"), (output,), prompts,
                            _textareas(controls, video_name), media="video",
                            frame_rate=(video.attr or {}).get("frameRate"))
    raise LabelingConfigError(
        "The labeling config has a <Video> but no <VideoRectangle> with <Labels> (at least one <Label>) on it: "
        'add e.g. <Labels name="labels" toName="video"><Label value="car"/></Labels> and '
        '<VideoRectangle name="box" toName="video"/>.'
    )


def _value_key(obj, tag: str, what: str) -> str:
    """The task field an object reads (``value="$field"``)."""
    value = obj.value or ""
    if not value.startswith("$") or len(value) < 2:
        raise LabelingConfigError(f'The <{tag} name="{obj.name}"> needs value="$field" naming the task field with the {what} URL.')
    return value[1:]


def _label_prompts(label_controls) -> dict[str, str]:
    """Each label's prompt: its ``hint`` (or ``prompt``) attribute when present, else its name."""
    prompts: dict[str, str] = {}
    for control in label_controls:
        for label, tag in (control.labels_attrs or {}).items():
            hint = next((tag.attr.get(a) for a in PROMPT_ATTRIBUTES if tag.attr.get(a)), None)
            prompts.setdefault(label, normalise_prompt(hint or label))
    return prompts


def _textareas(controls: list, object_name: str) -> tuple[str, ...]:
    """The prompt boxes: ``TextArea`` controls on the image or video."""
    return tuple(c.name for c in controls if c.tag.lower() == "textarea" and object_name in (c.to_name or []))
