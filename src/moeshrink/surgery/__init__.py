"""The one shared surgery that executes any plan: slice, merge, rebuild the router, update the config."""

from moeshrink.surgery.apply import apply_layer_plan, apply_model_plan, set_top_k, update_config

__all__ = ["apply_layer_plan", "apply_model_plan", "set_top_k", "update_config"]
