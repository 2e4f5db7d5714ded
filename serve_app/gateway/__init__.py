"""The gateway's request logic, under the routes and over the model handles.

:class:`~serve_app.gateway.core.GatewayCore` resolves models and admits requests; it owns a
:class:`~serve_app.gateway.dispatch.Dispatcher` (the only caller of model handles: timeouts,
cancellation, error translation, replica waits, metering) and
:class:`~serve_app.gateway.model_state.ModelStates` (load/unload). Beside them: metering,
merged embedding calls, ``start_within`` deadlines, batch jobs, webhooks and the voice
pipeline.
"""
