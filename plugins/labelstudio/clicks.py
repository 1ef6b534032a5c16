"""Clicks and boxes from an interactive request: Label Studio's smart ``KeyPointLabels`` and
``RectangleLabels`` regions as one object's pixel prompts for `Segmenter.segment_object`.

Label Studio sends geometry in percent of the image size (``x``, ``y``, ``width``, ``height``);
a keypoint's ``is_positive`` says whether it is on the object (missing: positive). Several
clicks and at most one box make one object; its label is the label of the last click or box.
"""

from __future__ import annotations

from dataclasses import dataclass

from promptseg.errors import PromptError

KEYPOINT, RECTANGLE = "keypointlabels", "rectanglelabels"


@dataclass(frozen=True)
class Clicks:
    """One object's prompts in percent of the image: points ``(x, y)`` with labels 1/0, a box
    ``(x0, y0, x1, y1)``, and the label the region gets (None: the region named none)."""

    points: tuple[tuple[float, float], ...]
    point_labels: tuple[int, ...]
    box: tuple[float, float, float, float] | None
    label: str | None

    def in_pixels(self, height: int, width: int) -> dict:
        """The keyword arguments of `segment_object` for an image of `height` x `width` pixels."""
        prompts: dict = {}
        if self.points:
            prompts["points"] = [(x * width / 100.0, y * height / 100.0) for x, y in self.points]
            prompts["point_labels"] = list(self.point_labels)
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            prompts["box"] = (x0 * width / 100.0, y0 * height / 100.0, x1 * width / 100.0, y1 * height / 100.0)
        return prompts


def clicks_in(context: dict | None, image_name: str) -> Clicks | None:
    """The keypoints and rectangle on `image_name` in an interactive context (None: there are none).

    A keypoint outside 0..100 %, a rectangle with no area or off the image, or geometry that is not
    numbers is a `PromptError` naming the region, so the task fails with a message, never the server.
    """
    if not isinstance(context, dict):
        return None
    points, labels, box, label = [], [], None, None
    for item in context.get("result") or []:
        if not isinstance(item, dict) or item.get("to_name", image_name) != image_name:
            continue
        kind = str(item.get("type", "")).lower()
        if kind not in (KEYPOINT, RECTANGLE):
            continue
        value = item.get("value")
        if not isinstance(value, dict):
            raise PromptError(f"The {kind} region has no 'value' object: send the region as Label Studio stores it.")
        if kind == KEYPOINT:
            points.append((_percent(value, "x", kind), _percent(value, "y", kind)))
            labels.append(0 if item.get("is_positive", True) in (False, 0, "false", "0") else 1)
        else:
            box = _rectangle(value)
        label = _label(value, kind) or label
    if not points and box is None:
        return None
    return Clicks(tuple(points), tuple(labels), box, label)


def _percent(value: dict, key: str, kind: str) -> float:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise PromptError(f"The {kind} region's {key!r} must be a number (percent of the image), got {number!r}.")
    if not 0.0 <= number <= 100.0:
        raise PromptError(
            f"The {kind} region's {key!r} is {number}%, outside the image (0..100%): place the "
            f"{'click' if kind == KEYPOINT else 'box'} on the image."
        )
    return float(number)


def _rectangle(value: dict) -> tuple[float, float, float, float]:
    """A rectangle's corners in percent; it must have an area and overlap the image."""
    x, y = (value.get(k) for k in ("x", "y"))
    width, height = (value.get(k) for k in ("width", "height"))
    numbers = (x, y, width, height)
    if any(isinstance(n, bool) or not isinstance(n, (int, float)) for n in numbers):
        raise PromptError(f"The rectangle's x, y, width and height must be numbers (percent), got {numbers!r}.")
    if width <= 0 or height <= 0:
        raise PromptError(f"The rectangle is {width}% x {height}% of the image, which has no area: drag a box "
                          "around the object.")
    if x >= 100 or y >= 100 or x + width <= 0 or y + height <= 0:
        raise PromptError(f"The rectangle at x={x}%, y={y}% (size {width}% x {height}%) lies off the image: "
                          "draw the box on the image.")
    return float(x), float(y), float(x + width), float(y + height)


def _label(value: dict, kind: str) -> str | None:
    names = value.get(kind)
    if isinstance(names, str):
        return names
    if isinstance(names, list) and names and isinstance(names[-1], str):
        return names[-1]
    return None
