"""The admin UI tests' fixtures (defined in ui_helpers.py)."""

from ui_helpers import admin, ui_server

__all__ = ["admin", "ui_server"]
