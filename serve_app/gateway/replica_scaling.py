"""Set a model deployment's replica count from the gateway (unload to 0, load back).

Uses Serve's external scaling API (Ray 2.60: the controller's ``update_deployment_replicas``),
which Serve allows only for applications deployed with ``external_scaler_enabled: true``
(config/local.yaml sets it) and therefore without Serve's own autoscaling. In any other
app these calls return False and unload keeps its replicas, freeing only the engine.
"""

from __future__ import annotations

import logging
from typing import Optional

__all__ = ["set_replicas"]

logger = logging.getLogger("troupe.scaling")


async def set_replicas(deployment_name: str, target: int) -> bool:
    """Ask Serve for ``target`` replicas of ``deployment_name`` in this replica's app.

    Returns False (nothing changed) outside a Serve replica, when the app was not deployed
    with ``external_scaler_enabled``, or when the controller refuses.
    """
    app_name = _app_name()
    if app_name is None:
        return False
    try:
        import ray
        from ray.serve._private.common import DeploymentID
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        if not await controller.get_external_scaler_enabled.remote(app_name):
            return False
        await controller.update_deployment_replicas.remote(
            DeploymentID(name=deployment_name, app_name=app_name), target
        )
        return True
    except Exception:
        logger.warning("could not set %s to %d replicas", deployment_name, target, exc_info=True)
        return False


def _app_name() -> Optional[str]:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # not inside a Serve replica (in-process tests)
        return None
