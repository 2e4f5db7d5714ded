"""Gateway policies, applied in one ASGI layer (:mod:`serve_app.policies.layer`): API keys
and JWTs (:mod:`.keys`, :mod:`.jwt_auth`), model scopes (:mod:`.context`), rate limits
leased from the quota actor (:mod:`.ratelimit`), idempotency keys (:mod:`.idempotency`)
and their settings (:mod:`.settings`)."""
