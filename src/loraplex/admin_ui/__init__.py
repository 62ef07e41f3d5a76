"""The operators' web UI: tenants, adapters, the GPU pool and live load, each page with a JSON twin.

    mount_admin_ui(app, AdminUiState(services, engine_thread, metrics_registry, admin_keys, name))

serves it under /admin of the API's app. Pages are rendered by Jinja2 from plain dicts (pages.py),
whose `.json` twins return the same dicts; static/ holds plain CSS and JavaScript, no build step.
"""

from .state import AdminUiState
from .ui import AdminUi, mount_admin_ui

__all__ = ["AdminUi", "AdminUiState", "mount_admin_ui"]
