"""`create_app`: the Flask app speaking Label Studio's ML backend protocol.

Endpoints Label Studio 1.23 calls: ``GET /health`` (and ``/``), ``POST /setup``,
``POST /predict`` (batch pre-annotation and interactive prompts), ``POST /webhook`` (annotation
events; promptseg does not train, so they are acknowledged), ``GET /versions``, plus ``/train``
and ``/metrics`` for older servers. Every error is JSON ``{"error": ...}``; a bad task fails
alone, inside a 200 response, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from promptseg.errors import PromptsegError
from promptseg_labelstudio.config import BackendConfig
from promptseg_labelstudio.labeling import LabelingConfigError
from promptseg_labelstudio.model import PromptsegModel

logger = logging.getLogger(__name__)

NOT_TRAINING = "promptseg is prompt-driven and does not train: nothing to do."


class BadRequest(PromptsegError):
    """The request body is not what Label Studio sends."""


def create_app(model: PromptsegModel | None = None, config: BackendConfig | None = None):
    """A Flask app around `model` (built from `config`, or the environment, when not given).

    The model, and so the weights and embedding caches, is made once here, not per request.
    """
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    if model is None:
        model = PromptsegModel(config or BackendConfig.from_env())
    config = model.config
    app = Flask("promptseg_labelstudio")
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.extensions["promptseg_model"] = model
    auth = (config.basic_auth_user, config.basic_auth_pass) if config.basic_auth_user else None

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BadRequest("The request body must be a JSON object (Content-Type: application/json).")
        return data

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
        return jsonify(model.setup(str(project or ""), schema, data.get("hostname"),
                                   data.get("access_token"), data.get("extra_params")))

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list of Label Studio tasks.")
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        context = params.get("context") or data.get("context") or None
        results = model.predict(tasks, data.get("label_config"), project=data.get("project"), context=context)
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
