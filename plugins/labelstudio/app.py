"""`create_app`: the Flask app speaking Label Studio's ML backend protocol.

Endpoints Label Studio 1.23 calls: ``GET /health`` (and ``/``), ``POST /setup``,
``POST /predict`` (batch pre-annotation and interactive prompts), ``POST /webhook`` (annotation
events; promptseg does not train, so they are acknowledged), ``GET /versions``, plus ``/train``
and ``/metrics`` for older servers. Every error is JSON ``{"error": ...}``; a bad task fails
alone, inside a 200 response, and the server keeps serving.

WSGI servers run requests on a fixed pool of threads. ``/predict`` (downloads and inference)
may hold at most ``config.work_slots`` of them; a request beyond that gets 503 with
``Retry-After`` at once, so ``/health`` and ``/setup`` always find a free thread.
"""

from __future__ import annotations

import hmac
import logging
import threading
from typing import Any

from promptseg.errors import PromptsegError
from promptseg_labelstudio.config import BackendConfig
from promptseg_labelstudio.labeling import JSON_TYPES, LabelingConfigError
from promptseg_labelstudio.model import PromptsegMLBackend

logger = logging.getLogger(__name__)

NOT_TRAINING = "promptseg is prompt-driven and does not train: nothing to do."
RETRY_AFTER_SECONDS = 5


class BadRequest(PromptsegError):
    """The request body is not what Label Studio sends."""


def create_app(model: PromptsegMLBackend | None = None, config: BackendConfig | None = None):
    """A Flask app around `model` (built from `config`, or the environment, when not given).

    The model, and so the weights and embedding caches, is made once here, not per request.
    """
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    if model is None:
        model = PromptsegMLBackend(config or BackendConfig.from_env())
    config = model.config
    app = Flask("promptseg_labelstudio")
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.extensions["promptseg_model"] = model
    auth = (config.basic_auth_user, config.basic_auth_pass) if config.basic_auth_user else None

    slots = threading.BoundedSemaphore(config.work_slots) if config.work_slots else None

    def body() -> dict[str, Any]:
        try:
            data = request.get_json(silent=True)
        except RecursionError:
            raise BadRequest("The request body is JSON nested too deeply: send Label Studio's request as it is.") from None
        if not isinstance(data, dict):
            raise BadRequest("The request body must be a JSON object (Content-Type: application/json).")
        return data

    def optional_text(data: dict, key: str) -> str | None:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{key!r} must be a string or null, got a JSON {JSON_TYPES.get(type(value), 'value')}.")
        return value

    def busy():
        return Response(
            '{"error": "The backend is busy: every prediction slot is taken. Retry in a few seconds, or start '
            'the backend with more --threads (or a higher PROMPTSEG_WORK_SLOTS)."}', 503,
            {"Retry-After": str(RETRY_AFTER_SECONDS), "Content-Type": "application/json"})

    @app.before_request
    def check_auth():
        if auth is None:
            return None
        given = request.authorization
        if (given is None or given.type != "basic"
                or not hmac.compare_digest((given.username or "").encode(), auth[0].encode())
                or not hmac.compare_digest((given.password or "").encode(), auth[1].encode())):
            return Response('{"error": "Unauthorized: give the basic auth user and password."}', 401,
                            {"WWW-Authenticate": 'Basic realm="promptseg"', "Content-Type": "application/json"})
        return None

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": type(model).__name__,
                        "model_version": model.model_version, **model.segmenter.describe()})

    @app.post("/setup")
    def setup():
        data = body()
        schema = data.get("schema") or data.get("label_config")
        project = data.get("project")
        return jsonify(model.setup(str(project or ""), schema, optional_text(data, "hostname"),
                                   optional_text(data, "access_token"), data.get("extra_params")))

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list of Label Studio tasks.")
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        context = params.get("context") or data.get("context") or None
        if slots is not None and not slots.acquire(blocking=False):
            logger.warning("Refused a /predict request: all %d prediction slots are busy", config.work_slots)
            return busy()
        try:
            results = model.predict(tasks, data.get("label_config"), project=data.get("project"), context=context)
        finally:
            if slots is not None:
                slots.release()
        return jsonify({"results": results, "model_version": model.model_version})

    @app.post("/webhook")
    def webhook():
        data = body()
        action = data.get("action")
        logger.debug("Webhook %s acknowledged", action)
        return jsonify({"status": "ok", "action": action, "result": NOT_TRAINING}), 200

    @app.post("/train")
    def train():
        body()
        return jsonify({"status": "ok", "result": NOT_TRAINING})

    @app.get("/versions")
    def versions():
        return jsonify({"versions": [model.model_version]})

    @app.get("/metrics")
    def metrics():
        seg = model.segmenter
        return jsonify({"image_encoder_runs": seg.stats.image_encoder_runs,
                        "text_encoder_runs": seg.stats.text_encoder_runs,
                        "decoder_runs": seg.stats.decoder_runs})

    @app.errorhandler(BadRequest)
    @app.errorhandler(LabelingConfigError)
    def bad_request(exc):
        return jsonify({"error": str(exc)}), 400

    @app.errorhandler(PromptsegError)
    def promptseg_error(exc):
        return jsonify({"error": str(exc)}), 422

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return jsonify({"error": f"{exc.name}: {exc.description}"}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc):
        logger.exception("Unexpected error on %s", request.path)
        return jsonify({"error": f"Internal error ({type(exc).__name__}); see the backend's log."}), 500

    return app
