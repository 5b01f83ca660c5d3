"""The one shared surgery that executes any plan: slice, merge, rebuild the router, update the config;
and the one router installer that re-routes a layer in place and restores it exactly."""

from moeshrink.surgery.apply import apply_layer_plan, apply_model_plan, set_top_k, update_config
from moeshrink.surgery.router import (
    RouteFn,
    RouterState,
    install_router,
    installed_router,
    set_router_expert_count,
)

__all__ = [
    "RouteFn",
    "RouterState",
    "apply_layer_plan",
    "apply_model_plan",
    "install_router",
    "installed_router",
    "set_router_expert_count",
    "set_top_k",
    "update_config",
]
