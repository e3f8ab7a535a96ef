"""dewey-serve: an OpenAI-compatible embedding server (FastAPI + uvicorn) over one Dewey model, with
Dewey's late-chunking endpoint, one batcher shared by all requests, backpressure, API keys, Prometheus
metrics and a draining SIGTERM. Run it with the ``dewey-serve`` command (``dewey_serve.cli``); build
the app in Python with ``dewey_serve.app.create_app``. Needs the ``serve`` extra:
``pip install 'dewey[serve]'`` plus a backend extra.
"""
