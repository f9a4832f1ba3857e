"""``python -m brittle.serve MONITOR.onnx``: an exported monitor over HTTP, with metrics.

Install with ``pip install "brittle[serve]"`` (FastAPI, uvicorn, prometheus-client).
The server runs the ONNX file with onnxruntime (``brittle.OnnxMonitor``) and
never imports torch. Endpoints:

- ``POST /predict`` with ``{"inputs": [...]}`` (a batch of nested lists; add
  ``"logits": true`` for the logits) answers ``pred``, ``margin`` and ``flag`` per
  sample;
- the Open Inference Protocol (KServe v2) under ``/v2``: health, model metadata
  and ``POST /v2/models/{name}/infer`` (``brittle.deploy.serve.oip``);
- ``GET /metrics``: Prometheus text format (``brittle_samples_total``,
  ``brittle_flagged_total``, ``brittle_rejected_total{reason}``,
  ``brittle_requests_total{code}``, ``brittle_connections_closed_total{reason}``,
  ``brittle_body_bytes_held``,
  the ``brittle_margin`` histogram, the
  ``brittle_flag_rate_alarm`` gauge, ...);
- ``GET``/``HEAD /healthz``; ``GET /openapi.json`` states every route's schema.

Bodies are bounded in bytes before they are parsed (``brittle.deploy.serve.body``)
and every malformed one gets a one-line 4xx that never quotes the input; each
request must arrive whole within a deadline, an answer may not stay unread longer,
and open connections are capped
(``brittle.deploy.serve.connections``); the bytes of bodies held at once and the
requests judged at once are bounded too, a request beyond them getting 503
(``brittle.deploy.serve.admission``).

``brittle.deploy.serve.app.create_app`` builds the same app in Python, and
``brittle.deploy.serve.metrics.TelemetryCollector`` exposes a ``brittle.Telemetry`` in a
user's own ``prometheus_client`` registry (``examples/fastapi_app.py``).
"""

__all__: list[str] = []
