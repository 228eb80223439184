"""The app's actions as plain functions (``Studio``); ``app.py`` only lays them out in Gradio."""
from .actions import Studio, StudioError

__all__ = ["Studio", "StudioError"]
