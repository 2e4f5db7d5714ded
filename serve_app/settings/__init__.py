"""Troupe's one settings tree.

The Serve config's ``args`` (or a YAML file named by ``config_file`` there or by the
``TROUPE_CONFIG_FILE`` environment variable) feed :class:`TroupeSettings`. Every model is
strict (``extra="forbid"``) and every field is described, so a typo fails at start with
the field's path, e.g. ``models.0.engine.mock.token_delay_ms``.

This package imports neither Ray, torch nor the OpenTelemetry SDK: engines, deployments,
actors and the gateway all read it. Its modules, by concern: ``base`` (the config error and
the strict base model), ``engines`` (text engine configs and the engine union),
``modality`` (engine configs of the other modalities), ``models`` (one model's deployment
options and prices), ``policies`` (auth, limits, idempotency, CORS, batch jobs),
``observability`` (tracing), ``tree`` (:class:`TroupeSettings` and :func:`load_settings`).
"""

from serve_app.settings.adapters import AdapterSettings
from serve_app.settings.base import ConfigError
from serve_app.settings.engines import (
    AnthropicEngineConfig,
    BreakerConfig,
    EngineConfig,
    GeminiEngineConfig,
    MockEngineConfig,
    OpenAIEngineConfig,
    RetryConfig,
    TransformersEngineConfig,
    VLLMEngineConfig,
)
from serve_app.settings.models import (
    AutoscalingOptions,
    DeploymentOptions,
    ModelConfig,
    PricingConfig,
    RayActorOptions,
)
from serve_app.settings.tree import (
    GatewayOptions,
    MetricsSettings,
    SessionSettings,
    TroupeSettings,
    load_settings,
)

__all__ = [
    "AdapterSettings",
    "ConfigError",
    "MockEngineConfig",
    "TransformersEngineConfig",
    "VLLMEngineConfig",
    "OpenAIEngineConfig",
    "AnthropicEngineConfig",
    "GeminiEngineConfig",
    "RetryConfig",
    "BreakerConfig",
    "SessionSettings",
    "EngineConfig",
    "RayActorOptions",
    "AutoscalingOptions",
    "DeploymentOptions",
    "PricingConfig",
    "ModelConfig",
    "GatewayOptions",
    "MetricsSettings",
    "TroupeSettings",
    "load_settings",
]
