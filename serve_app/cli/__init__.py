"""The ``troupe`` command: run, validate, status, keys, webhooks (``main.py``), reading Serve
configs in one place (``serve_config.py``)."""
