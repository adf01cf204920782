"""dsnet: dynamic slimmable supernets (DS-Net, DS-Net++), their routes, MAdds and deployment.

Public API: ``list_models``, ``create_model``, ``Route``, ``materialize``, ``split``, ``profile``,
``recalibrate_bn``, ``load_official_state_dict``. Models know nothing of backends.
"""

from dsnet.calibration import calibration_routes, recalibrate_bn, reference_statistics
from dsnet.checkpoint import load_official_state_dict
from dsnet.deploy import DynamicPlan, materialize, split
from dsnet.layers import EXEC_MODES
from dsnet.models import mobilenet as _mobilenet  # noqa: F401  (registers the built-in models)
from dsnet.profile import Profile, count_by_hooks, profile
from dsnet.registry import create_model, list_models, register_model, static_counterpart
from dsnet.routes import Route, RouteError

__all__ = [
    "EXEC_MODES", "DynamicPlan", "Profile", "Route", "RouteError", "count_by_hooks", "create_model",
    "list_models", "load_official_state_dict", "materialize", "profile",
    "calibration_routes", "recalibrate_bn", "reference_statistics", "register_model", "split", "static_counterpart",
]
