"""The quick-try page: Gradio components wired to `promptseg_app.callbacks`.

Each form field's range, default and help come from `SegmentOptions.describe`, so the page offers
what the core accepts. One job runs at a time (Gradio's queue, one slot shared by Segment and
Suggest); others wait their turn. Gradio's analytics are off and the page loads nothing from
outside the machine (the default theme's fonts are served locally).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from promptseg.options import DEFAULT_CLIP_THRESHOLD, MIN_TILE, option_info
from promptseg_app.callbacks import TABLE_HEADERS, CLIP_HEADER, TILING, QuickTry

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported and when Blocks are made
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402  (after the analytics switch above)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
"""The example images of a source checkout (a wheel has none: the page then offers upload only)."""
EXAMPLE_PROMPTS = {"chelsea": "cat, ear", "coffee": "cup, spoon, saucer"}
IMAGE_TYPES = ["image", ".tif", ".tiff"]
DEFAULT_TILE_SIZE = 1008  # SAM 3's input size: what 'on' starts from
JOB_SLOT = "promptseg-model"
"""The queue slot Segment and Suggest share: one job uses the model at a time."""
STYLE = ".promptseg-key { margin-right: 1em; white-space: nowrap; }"
SLIDER_LIMITS = {  # the form's ends where an option has none (or an open end) in the core
    "mask_threshold": (0.01, 0.99),
    "smooth": (0, 20),
}


def example_files() -> list[Path]:
    """The bundled example images, when this is a source checkout."""
    return sorted(EXAMPLES_DIR.glob("*.jpg")) if EXAMPLES_DIR.is_dir() else []


def _slider(name: str, label: str, step: float, **extra) -> gr.Slider:
    info = option_info(name)
    low, high = SLIDER_LIMITS.get(name, (info.minimum, info.maximum))
    return gr.Slider(low, high, value=info.default, step=step, label=label, info=info.help, elem_id=name, **extra)


def build_page(app: QuickTry) -> gr.Blocks:
    """The page's layout, events and queue (not launched)."""
    with gr.Blocks(title="promptseg: segment by text", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("## promptseg: type what you want segmented\n"
                    "Upload an image (or pick an example), type one or more prompts, press **Segment**. "
                    "A second prompt on the same image reuses its embedding.")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.File(label="Image", file_types=IMAGE_TYPES, type="filepath", elem_id="image-file")
                prompts = gr.Textbox(label="Prompts", lines=2, elem_id="prompts",
                                     placeholder="cat, ear (commas or one per line)",
                                     info="Noun phrases; every instance of each is found.")
                with gr.Row():
                    run = gr.Button("Segment", variant="primary", elem_id="segment")
                    suggest = gr.Button("Suggest prompts", visible=app.has_clip, elem_id="suggest")
                suggestions = gr.CheckboxGroup(label="Suggestions (tick to add to the prompts)", choices=[],
                                               visible=app.has_clip, elem_id="suggestions")
                threshold = _slider("threshold", "Score threshold", 0.01)
                mask_threshold = _slider("mask_threshold", "Mask threshold", 0.01)
                smooth = _slider("smooth", "Mask smoothness (px)", 1)
                min_area_info = option_info("min_area")
                min_area = gr.Number(value=min_area_info.default, minimum=min_area_info.minimum, precision=0,
                                     label="Min area (px)", info=min_area_info.help, elem_id="min_area")
                tile_info = option_info("tile")
                with gr.Row():
                    tiling = gr.Radio(list(TILING), value="off", label="Tiling", elem_id="tiling",
                                      info="'on': overlapping tiles of the size given; 'auto': tiles for images "
                                           "much larger than the model input")
                    tile_size = gr.Number(value=DEFAULT_TILE_SIZE, minimum=MIN_TILE, precision=0,
                                          label="Tile size (px)", elem_id="tile_size",
                                          info=f"with tiling 'on': each tile's side, at least {tile_info.minimum}")
                with gr.Accordion("CLIP checks", open=False, visible=app.has_clip):
                    negative = gr.Textbox(label="Negative phrases", elem_id="negative",
                                          info=option_info("negative").help, placeholder="toy car, drawing of a cat")
                    verify = gr.Checkbox(label="Verify with CLIP", value=option_info("verify").default,
                                         info=option_info("verify").help, elem_id="verify")
                    clip_threshold = gr.Slider(0, 1, value=DEFAULT_CLIP_THRESHOLD, step=0.01,
                                               label="CLIP threshold", elem_id="clip_threshold",
                                               info=option_info("clip_threshold").help)
                    exclusive = gr.Checkbox(label="One label per object", value=option_info("exclusive").default,
                                            info=option_info("exclusive").help, elem_id="exclusive")
                if not app.has_clip:
                    gr.Markdown("CLIP verification, negative phrases and prompt suggestions: start the page "
                                "with `--clip MODEL`.")
            with gr.Column(scale=3):
                status = gr.Markdown(app.preview(None)[1], elem_id="status")
                result = gr.Image(label="Result", type="numpy", format="png", interactive=False, elem_id="result")
                legend = gr.HTML(elem_id="legend")
                headers = TABLE_HEADERS + ([CLIP_HEADER] if app.has_clip else [])
                table = gr.Dataframe(headers=headers, interactive=False, label="Instances", elem_id="instances",
                                     max_height=1200)
                with gr.Row():
                    coco = gr.File(label="COCO JSON", interactive=False, elem_id="coco")
                    labels = gr.File(label="Label PNG (16-bit instance ids)", interactive=False, elem_id="labels")
        if example_files():
            gr.Examples([[str(path), EXAMPLE_PROMPTS.get(path.stem, "")] for path in example_files()],
                        inputs=[image, prompts], label="Examples")

        def on_segment(image, prompts, threshold, mask_threshold, smooth, min_area, tiling, tile_size,
                       negative, verify, clip_threshold, exclusive, progress=gr.Progress()):
            def report(done: int, total: int) -> None:
                progress((done, total), desc="tiles", unit="tiles")

            outcome = app.segment(image, prompts, threshold, mask_threshold, smooth, min_area, tiling, tile_size,
                                  negative, verify, clip_threshold, exclusive, report=report)
            return (outcome.status, outcome.overlay, outcome.legend, outcome.rows,
                    outcome.coco_path and str(outcome.coco_path), outcome.labels_path and str(outcome.labels_path))

        def on_suggest(image):
            phrases, message = app.suggest(image)
            return gr.update(choices=phrases, value=[]), message

        form = [image, prompts, threshold, mask_threshold, smooth, min_area, tiling, tile_size,
                negative, verify, clip_threshold, exclusive]
        outputs = [status, result, legend, table, coco, labels]
        run.click(on_segment, form, outputs, concurrency_limit=1, concurrency_id=JOB_SLOT)
        image.change(app.preview, image, [result, status])
        suggest.click(on_suggest, image, [suggestions, status], concurrency_limit=1, concurrency_id=JOB_SLOT)
        suggestions.input(QuickTry.add_prompts, [prompts, suggestions], prompts)
    return page.queue(default_concurrency_limit=1, max_size=32)


def serve(app: QuickTry, host: str, port: int) -> None:
    """Serve the page on `host`:`port` until Ctrl+C or SIGTERM (no share link, no outside calls);
    then close the server and remove the page's download files."""
    page = build_page(app)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        page.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False,
                    ssr_mode=False, mcp_server=False, pwa=False, prevent_thread_lock=False, quiet=True,
                    css=STYLE, allowed_paths=[str(path) for path in example_files()])
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.close()


def _interrupt(signum, frame) -> None:
    """SIGTERM (a service manager, ``kill PID``) stops the page as Ctrl+C does."""
    raise KeyboardInterrupt
