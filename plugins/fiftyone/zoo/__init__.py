"""promptseg as a FiftyOne remote model source: ``promptseg/sam3`` is `PromptsegModel` from the zoo.

    import fiftyone.zoo as foz
    foz.register_zoo_model_source("https://github.com/promptseg/promptseg")
    model = foz.load_zoo_model("promptseg/sam3", prompts=["car", "person"])
    dataset.apply_model(model, label_field="sam3")

FiftyOne finds ``manifest.json`` beside this file when it registers the repository, copies this
folder into its model zoo directory, calls `download_model` once and `load_model` on each load.
The weights stay where promptseg keeps them for every host (the Hugging Face cache, or a local
directory), so they are not stored twice: the zoo's "model file" (``sam3.json``, the manifest's
``base_filename``) only records which.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def download_model(model_name: str, model_path: str) -> None:
    """Fetch the weights (``PROMPTSEG_MODEL``, else ``facebook/sam3``) and record where they are.

    A hub id is downloaded into the Hugging Face cache with the user's login or ``HF_TOKEN`` (SAM 3
    is gated); a local directory (offline machines) is checked and recorded as it is. Either
    failure is a `ModelLoadError` that says how to fix it.
    """
    from promptseg.backends.sam3_hf import resolve_model_dir
    from promptseg.errors import ModelLoadError
    from promptseg.segmenter import default_model

    source = default_model()
    local = Path(source).expanduser()
    if local.exists():
        source = str(local.resolve())
    try:
        resolve_model_dir(source)  # downloads a hub id; checks a directory's config and weights
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"The zoo model {model_name} cannot get its weights: {exc} Set PROMPTSEG_MODEL to a hub id or to a "
            f"local model directory, then run foz.download_zoo_model({model_name!r}, overwrite=True)."
        ) from exc
    record = Path(model_path)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"model": source}))
    logger.info("Zoo model %s uses %s", model_name, source)


def load_model(model_name: str, model_path: str, model: str | None = None, **kwargs: Any):
    """A `PromptsegModel` on the recorded weights (or `model`, a hub id or directory, if given).

    Every other keyword goes to `PromptsegModel`: ``prompts``, ``device``, ``output``,
    ``prompt_field``, any `SegmentOptions` field (``threshold=0.4``) and so on.
    """
    from promptseg.errors import ModelLoadError
    from promptseg_fiftyone.model import PromptsegModel

    if model is None:  # FiftyOne calls download_model first whenever the record is missing
        model = json.loads(Path(model_path).read_text())["model"]
    try:
        return PromptsegModel(model=model, **kwargs)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"The zoo model {model_name} cannot load {model}: {exc} Pass model=<hub id or directory>, or set "
            f"PROMPTSEG_MODEL and run foz.download_zoo_model({model_name!r}, overwrite=True)."
        ) from exc
