"""Integration tests share the session's Serve app (fixtures in tests/mock_app.py)."""
