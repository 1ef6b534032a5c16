"""The `segment_with_text` operator (a form in the App, a callable in Python, a delegated job) and
the `suggest_prompts` operator (CLIP's ranked phrases for one sample, to copy into the first).

    import fiftyone.operators as foo
    segment = foo.get_operator("@promptseg/fiftyone/segment_with_text")
    segment(dataset_or_view, prompts=["car", "person"], label_field="sam3")  # or delegate=True

The work is `runner.segment_samples`, or `on_ray.segment_on_ray` when "Run on Ray" is on; this
module only turns form parameters into their arguments.
"""

from __future__ import annotations

import os
import time

import fiftyone.operators as foo
import fiftyone.operators.types as types

from promptseg.errors import OptionError, PromptsegError
from promptseg.options import SegmentOptions, option_info

DEVICES = ["auto", "cpu", "cuda", "mps"]
OUTPUT_CHOICES = {
    "detections": "Detections (one mask per instance)",
    "segmentation": "Segmentation (one semantic mask per sample)",
    "polylines": "Polylines (instance polygons)",
}
PROMPT_TYPES = ("StringField", "ListField", "Classification", "Classifications", "Detections")
FORM_OPTIONS = {
    "threshold": "Score threshold",
    "mask_threshold": "Mask threshold",
    "min_area": "Minimum area (pixels)",
    "smooth": "Mask smoothness (pixels)",
    "max_instances": "Maximum instances per image",
}
"""The `SegmentOptions` the App's form shows (defaults, ranges and help come from the core); the
Python call and ``segment_samples`` take every option."""
SELECTION_TARGETS = ("SELECTED_SAMPLES", "SELECTED_LABELS")
"""View targets that are a selection: the form offers Ray for whole datasets and views only."""
IMMEDIATE_MAX_SAMPLES = 20
"""The App's default for a run: the whole dataset, or a view or selection of more samples than this,
is scheduled (a delegated run, so the App stays free); a smaller view or selection runs now."""
HUB_TOKEN_SECRET = "HF_TOKEN"
"""The plugin secret (``secrets`` in fiftyone.yml) holding a Hugging Face token for gated weights."""
MODEL_SECRET = "PROMPTSEG_MODEL"
"""The plugin secret naming the default model (a hub id or a directory the workers can read)."""
LAUNCH_WORKER = "fiftyone delegated launch"
SEGMENT_URI = "@promptseg/fiftyone/segment_with_text"


class SegmentWithText(foo.Operator):
    """Segment every instance of each text prompt in the target samples (SAM 3 via promptseg)."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_with_text",
            label="Segment with text (promptseg)",
            description="Type what you want segmented; get every instance as a Detections mask.",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_delegation(self, ctx):
        """``delegate=True`` in the params forces a delegated run; otherwise the App offers both."""
        return True if ctx.params.get("delegate") else None

    def resolve_execution_options(self, ctx):
        """Run now or schedule; large runs are scheduled by default (see `delegates_by_default`)."""
        if self.resolve_delegation(ctx):
            return super().resolve_execution_options(ctx)
        from fiftyone.operators.executor import ExecutionOptions

        return ExecutionOptions(
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=delegates_by_default(ctx),
        )

    def resolve_input(self, ctx):
        from promptseg.segmenter import default_model

        inputs = types.Object()
        inputs.view_target(ctx, action_description="Segment")
        _execution_notice(inputs, ctx)
        prompts = inputs.list(
            "prompts", types.String(), required=not ctx.params.get("prompt_field"), label="Prompts",
            description="Noun phrases, one per entry: 'red car', 'person', 'nucleus'. Leave empty when the "
            "prompt field holds boxes.",
        )
        problem = _prompt_problem(ctx.params.get("prompts"), ctx.params.get("prompt_field"))
        if problem:
            prompts.invalid, prompts.error_message = True, problem
        output = ctx.params.get("output") or "detections"
        choices = types.Dropdown()
        for value, text in OUTPUT_CHOICES.items():
            choices.add_choice(value, label=text)
        inputs.enum(
            "output", choices.values(), default="detections", label="Output",
            description="Label type to write: instance masks, one class-id mask per sample, or polygons.",
            view=choices,
        )
        kind = {"detections": "Detections", "segmentation": "Segmentation", "polylines": "Polylines"}.get(output)
        label_field = inputs.str(
            "label_field", default="promptseg", required=True, label="Label field",
            description=f"New or existing {kind or 'label'} field to write the results to.",
        )
        problem = _label_field_problem(ctx, ctx.params.get("label_field", "promptseg"), output)
        if problem:
            label_field.invalid, label_field.error_message = True, problem
        _option_input(inputs, ctx, "threshold")
        inputs.bool(
            "overwrite", default=False, label="Overwrite",
            description="Redo samples that already have the label field (otherwise they are skipped, "
            "so an interrupted run resumes).",
        )
        inputs.str(
            "model", default=None, required=False, label="Model",
            description=f"Hub id or local directory (default: {_secret(ctx, MODEL_SECRET) or default_model()}).",
        )
        inputs.enum("device", DEVICES, default="auto", label="Device", view=types.DropdownView())
        fields = _fields_of(ctx, PROMPT_TYPES)
        if fields:
            inputs.enum(
                "prompt_field", fields, required=False, label="Prompt field (optional)",
                description="Each sample's own prompts: text (string, list, Classification(s)) adds to the "
                "prompts above; Detections segment each box as one object, keeping its label.",
                view=types.AutocompleteView(),
            )
        boxes = _fields_of(ctx, ("Detections",))
        if boxes:
            inputs.enum(
                "exemplar_field", boxes, required=False, label="Exemplar boxes (optional)",
                description="Detections whose boxes are examples of what to find.",
                view=types.AutocompleteView(),
            )
        if ctx.dataset is not None and ctx.dataset.media_type == "video":
            _video_inputs(inputs)
        else:
            for name in FORM_OPTIONS:
                if name != "threshold":
                    _option_input(inputs, ctx, name)
        if _ray_offered(ctx):
            _ray_inputs(inputs, ctx)
        return types.Property(inputs, view=types.View(label="Segment with text"))

    def execute(self, ctx):
        from promptseg_fiftyone.runner import segment_samples

        params = ctx.params
        target = ctx.target_view()
        video = target.media_type == "video"
        try:
            if params.get("on_ray") and _ray_offered(ctx):
                summary = _segment_on_ray(ctx, target)
            else:
                summary = segment_samples(
                    target,
                    prompts=params.get("prompts") or None,
                    label_field=params.get("label_field", "promptseg"),
                    model=params.get("model") or _secret(ctx, MODEL_SECRET),
                    token=_secret(ctx, HUB_TOKEN_SECRET),
                    device=params.get("device") or "auto",
                    prompt_field=params.get("prompt_field") or None,
                    exemplar_field=params.get("exemplar_field") or None,
                    overwrite=bool(params.get("overwrite", False)),
                    output=params.get("output") or "detections",
                    progress=_ProgressReporter(ctx, unit="frames" if video else "samples"),
                    options=SegmentOptions.from_flat(**_options_in(params)),
                    **({"stride": int(params.get("stride") or 1), "new_threshold": params.get("new_threshold")}
                       if video else {}),
                )
        except PromptsegError as exc:
            raise ValueError(str(exc)) from exc
        if not ctx.delegated:
            ctx.trigger("reload_dataset")
        return summary.to_dict()

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("processed", label="Samples segmented")
        outputs.int("instances", label="Instances found")
        outputs.int("skipped", label="Skipped (already had the field)")
        outputs.int("failed_count", label="Images that could not be read")
        outputs.list("failed", types.Object(), label="Failures")
        return types.Property(outputs, view=types.View(label="promptseg"))

    def __call__(
        self,
        sample_collection,
        prompts=None,
        label_field="promptseg",
        *,
        model=None,
        device="auto",
        overwrite=False,
        prompt_field=None,
        exemplar_field=None,
        output="detections",
        stride=1,
        new_threshold=None,
        delegate=False,
        delegation_target=None,
        on_ray=False,
        ray_address=None,
        actors=2,
        gpus_per_actor=0,
        options: SegmentOptions | None = None,
        **flat,
    ):
        """Run on a dataset or view from Python; ``delegate=True`` queues it instead.

        `options` (a `SegmentOptions`) and options by name (``threshold=0.3``, any
        `SegmentOptions` field) are checked here, before anything is queued. `stride` and
        `new_threshold` apply to video datasets (see `runner.segment_samples`). ``on_ray=True`` runs
        it on `actors` Ray actors (`gpus_per_actor` GPUs each) of the cluster at `ray_address`, or of
        a local Ray without one (see `on_ray.segment_on_ray`).
        """
        from promptseg_fiftyone.runner import check_segment_options

        if isinstance(prompts, str):
            prompts = [prompts]
        chosen = check_segment_options(options=options, **flat).changed()
        params = {
            "prompts": list(prompts or []),
            "label_field": label_field,
            "model": model,
            "device": device,
            "overwrite": overwrite,
            "prompt_field": prompt_field,
            "exemplar_field": exemplar_field,
            "output": output,
            "delegate": delegate,
            **({"on_ray": True, "ray_address": ray_address, "ray_actors": actors,
                "ray_gpus_per_actor": gpus_per_actor} if on_ray else {}),
            **({"stride": stride, "new_threshold": new_threshold} if sample_collection.media_type == "video" else {}),
            # params travel as JSON (a delegated run stores them): tuples become lists
            **{name: list(value) if isinstance(value, tuple) else value for name, value in chosen.items()},
        }
        return foo.execute_operator(
            self.uri,
            {"view": sample_collection.view()},
            params=params,
            request_delegation=delegate,
            delegation_target=delegation_target,
        )


class SuggestPrompts(foo.Operator):
    """Rank a vocabulary of phrases by how likely CLIP finds them in the current sample's image."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="suggest_prompts",
            label="Suggest prompts (promptseg)",
            description="CLIP's most likely phrases for the open (or first selected) sample.",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        from promptseg.segmenter import default_model

        inputs = types.Object()
        sample_id = _sample_for(ctx)
        if sample_id is None:
            inputs.view("none", types.Warning(label="Open a sample or select one to get suggestions for it."))
        inputs.int("k", default=10, min=1, label="Number of suggestions")
        inputs.str(
            "clip", default=os.environ.get("PROMPTSEG_CLIP") or None, required=False, label="CLIP model",
            description="OpenCLIP NAME/TAG, NAME/PATH, hf-hub:ORG/REPO or local-dir:DIR "
            "(default: PROMPTSEG_CLIP, else ViT-B-32/laion2b_s34b_b79k).",
        )
        inputs.str(
            "model", default=None, required=False, label="Model",
            description=f"Segmentation model loaded with it (default: {default_model()}).",
        )
        inputs.enum("device", DEVICES, default="auto", label="Device", view=types.DropdownView())
        inputs.list(
            "vocabulary", types.String(), required=False, label="Vocabulary (optional)",
            description="Phrases to rank; empty means the shipped COCO + LVIS names.",
        )
        return types.Property(inputs, view=types.View(label="Suggest prompts"))

    def execute(self, ctx):
        from promptseg.sessions import shared_segmenter

        params = ctx.params
        sample_id = _sample_for(ctx)
        if sample_id is None:
            raise ValueError("No sample: open a sample in the App or select one, then run Suggest prompts.")
        filepath = ctx.dataset[sample_id].filepath
        try:
            token = _secret(ctx, HUB_TOKEN_SECRET)
            segmenter = shared_segmenter(
                params.get("model") or _secret(ctx, MODEL_SECRET), device=params.get("device") or "auto",
                clip=params.get("clip") or os.environ.get("PROMPTSEG_CLIP") or True,
                **({"token": token} if token else {}),
            )
            ranked = segmenter.suggest_prompts(filepath, params.get("vocabulary") or None, k=int(params.get("k", 10)))
        except PromptsegError as exc:
            raise ValueError(str(exc)) from exc
        return {
            "sample_id": sample_id,
            "filepath": filepath,
            "suggestions": [{"phrase": phrase, "score": score} for phrase, score in ranked],
            "prompts": ", ".join(phrase for phrase, _ in ranked),
        }

    def resolve_output(self, ctx):
        outputs = types.Object()
        table = types.TableView()
        table.add_column("phrase", label="Phrase")
        table.add_column("score", label="CLIP probability")
        outputs.list("suggestions", types.Object(), label="Suggested prompts, most likely first", view=table)
        outputs.str("prompts", label="Copy into Segment with text")
        return types.Property(outputs, view=types.View(label="promptseg suggestions"))


def delegates_by_default(ctx) -> bool:
    """Whether the App should offer "Schedule" (a delegated run) before "Execute" for this target.

    The whole dataset, or a view or selection of more than `IMMEDIATE_MAX_SAMPLES` samples, is
    scheduled by default, so a long run does not hold the App; a small view or selection runs now.
    """
    if ctx.dataset is None:
        return False
    target = ctx.target_view()
    return _schedules(target, len(target))


def _schedules(target, count: int) -> bool:
    import fiftyone as fo

    return isinstance(target, fo.Dataset) or count > IMMEDIATE_MAX_SAMPLES


def _execution_notice(inputs, ctx) -> None:
    """Tell the user how the run executes by default, and when no delegated worker seems to run."""
    if ctx.dataset is None:
        return
    target = ctx.target_view()
    count = len(target)
    if _schedules(target, count):
        text = (f"{count} samples: scheduled by default as a delegated run (the whole dataset, or more than "
                f"{IMMEDIATE_MAX_SAMPLES} samples), so the App stays free. A worker started with `{LAUNCH_WORKER}` "
                "runs it; choose Execute to run it now instead.")
    else:
        text = (f"{count} samples: runs now by default (a view or selection of at most {IMMEDIATE_MAX_SAMPLES} "
                f"samples). Choose Schedule to hand it to a worker started with `{LAUNCH_WORKER}`.")
    inputs.view("execution_notice", types.Notice(label=text))
    waiting = queued_runs(ctx.dataset.name)
    if waiting:
        inputs.view("queued_warning", types.Warning(
            label=f"{waiting} earlier run(s) of Segment with text on this dataset are still queued: no delegated "
            f"worker seems to be running. Start one with `{LAUNCH_WORKER}` (same database and plugins)."))


def queued_runs(dataset_name: str) -> int:
    """How many delegated runs of `segment_with_text` on the dataset wait for a worker."""
    from fiftyone.operators.delegated import DelegatedOperationService

    return len(DelegatedOperationService().get_queued_operations(operator=SEGMENT_URI, dataset_name=dataset_name))


def _secret(ctx, key: str) -> str | None:
    """A plugin secret (fiftyone.yml ``secrets``): an environment variable of the App server or the
    delegated worker in open-source FiftyOne, the secrets store in FiftyOne Enterprise. Never logged."""
    value = ctx.secrets.get(key)
    value = getattr(value, "value", value)  # a secret resolved on first access comes as a Secret object
    return value or None


def _sample_for(ctx) -> str | None:
    """The open sample, else the first selected one."""
    if ctx.current_sample:
        return ctx.current_sample
    return ctx.selected[0] if ctx.selected else None


class _ProgressReporter:
    """The core's ``progress(total, advance)`` as FiftyOne's ``ctx.set_progress(fraction, label)``.

    Sent at the start, at the end and at most once a second in between.
    """

    def __init__(self, ctx, interval: float = 1.0, unit: str = "samples") -> None:
        self.ctx, self.interval, self.last, self.done, self.unit = ctx, interval, 0.0, 0, unit

    def __call__(self, total: int, advance: int) -> None:
        self.done = self.done + advance if advance else 0  # advance 0 announces the total
        now = time.monotonic()
        if self.done not in (0, total) and now - self.last < self.interval:
            return
        self.last = now
        self.ctx.set_progress(progress=self.done / total if total else 1.0,
                              label=f"Segmented {self.done} of {total} {self.unit}")


def _ray_offered(ctx) -> bool:
    """Whether the form offers "Run on Ray": an image dataset, a whole dataset or view as the target."""
    if ctx.dataset is None or ctx.dataset.media_type == "video":
        return False
    target = ctx.params.get("view_target") or ctx.request_params.get("view_target")
    return target not in SELECTION_TARGETS


def _ray_inputs(inputs, ctx) -> None:
    """The form fields of a run on Ray: the switch, then the cluster, the actors and their GPUs."""
    switch = inputs.bool(
        "on_ray", default=False, label="Run on Ray",
        description="Segment on Ray actors that each keep one loaded model; labels are written in bulk "
        "and a rerun skips the samples already done. The actors read the samples' filepaths.",
    )
    if not ctx.params.get("on_ray"):
        return
    problem = _ray_problem(ctx.params)
    if problem:
        switch.invalid, switch.error_message = True, problem
    inputs.str("ray_address", default=None, required=False, label="Ray address",
               description="A Ray cluster: HOST:6379, or 'auto' on one of its machines. Blank: a local Ray "
               "on this machine, started for the run.")
    inputs.int("ray_actors", default=2, min=1, label="Actors",
               description="Ray actors, each with one loaded model and one CPU.")
    inputs.float("ray_gpus_per_actor", default=0, min=0, label="GPUs per actor",
                 description="0 on CPU clusters; 1 gives each actor a GPU (the model then runs in fp16).")


def _ray_problem(params) -> str | None:
    """Why a run cannot go to Ray, or None: Ray runs take the typed prompts only."""
    used = [label for name, label in (("prompt_field", "Prompt field"), ("exemplar_field", "Exemplar boxes"))
            if params.get(name)]
    if used:
        return (f"Runs on Ray take the typed prompts only, not {' or '.join(used)}: clear "
                f"{' and '.join(used)}, or turn Run on Ray off.")
    return None


def _segment_on_ray(ctx, target):
    """The operator's run on Ray actors (`on_ray.segment_on_ray`) with the form's parameters."""
    from promptseg_fiftyone.on_ray import segment_on_ray

    params = ctx.params
    problem = _ray_problem(params)
    if problem:
        raise OptionError(problem)
    device = params.get("device") or "auto"
    return segment_on_ray(
        target,
        prompts=params.get("prompts") or None,
        label_field=params.get("label_field", "promptseg"),
        actors=int(params.get("ray_actors") or 2),
        address=params.get("ray_address") or None,
        num_gpus_per_actor=float(params.get("ray_gpus_per_actor") or 0),
        model=params.get("model") or _secret(ctx, MODEL_SECRET),
        device=None if device == "auto" else device,
        overwrite=bool(params.get("overwrite", False)),
        output=params.get("output") or "detections",
        progress=_ProgressReporter(ctx),
        options=SegmentOptions.from_flat(**_options_in(params)),
    )


def _video_inputs(inputs) -> None:
    """The form fields of a video dataset: which frames, and the score that starts a new object."""
    inputs.int("stride", default=1, min=1, required=False, label="Frame stride",
               description="Segment every N-th frame (1: every frame).")
    inputs.float("new_threshold", default=None, required=False, min=0.0, max=1.0, label="New object threshold",
                 description="Score a detection needs to start a new track (empty: 0.7 at the default threshold 0.5).")


def _prompt_problem(prompts, prompt_field) -> str | None:
    """What the core would say about the typed prompts (the form shows it next to the field)."""
    from promptseg.results import ensure_prompt_list

    if not prompts:
        return None if prompt_field else "Add at least one prompt, e.g. 'car'."
    try:
        ensure_prompt_list(prompts)
    except PromptsegError as exc:
        return str(exc)
    return None


def _option_input(inputs, ctx, name: str) -> None:
    """One form field for a core option: its default, range and help are the core's."""
    info = option_info(name)
    add = inputs.float if info.kind is float else inputs.int
    limits = {key: value for key, value in (("min", info.minimum), ("max", info.maximum)) if value is not None}
    field = add(name, default=info.default, required=False, label=FORM_OPTIONS[name],
                description=info.help[:1].upper() + info.help[1:] + ".", **limits)
    problem = _option_problem(name, ctx.params.get(name))
    if problem:
        field.invalid, field.error_message = True, problem


def _option_problem(name: str, value) -> str | None:
    """What the core says about one option's value (the form shows it next to the field)."""
    if value is None:
        return None
    try:
        SegmentOptions.from_flat(**{name: value})
    except OptionError as exc:
        return str(exc)
    return None


def _options_in(params: dict) -> dict:
    """The core options among the params: the form's fields, or any option a Python call sent.

    An empty form field (None) keeps the core's default, unless None is a value of that option
    (``max_instances=None``: all; ``iou_threshold=None``: off).
    """
    return {
        name: params[name] for name in SegmentOptions.names()
        if name in params and (params[name] is not None or option_info(name).optional)
    }


def _label_field_problem(ctx, label_field, output="detections") -> str | None:
    from promptseg_fiftyone.runner import check_label_field

    if ctx.dataset is None:
        return None
    try:
        check_label_field(ctx.dataset, label_field, output)
    except PromptsegError as exc:
        return str(exc)
    return None


def _fields_of(ctx, type_names) -> list[str]:
    if ctx.dataset is None:
        return []
    out = []
    for name, field in ctx.dataset.get_field_schema().items():
        kind = getattr(field, "document_type", None) or type(field)
        if kind.__name__ in type_names and name not in ("filepath", "id", "tags"):
            out.append(name)
    return sorted(out)
