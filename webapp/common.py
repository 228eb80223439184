"""What every screen shares: the error a person sees, and the limits the server enforces whatever a page sends."""
from __future__ import annotations

CONDITION_TAGS = ["front", "side", "back", "top", "dark", "bright", "blurry", "far", "close"]
MIN_PHOTOS_PER_PRODUCT = 5
MAX_UPLOAD_MB = 20          # per file (Gradio refuses larger uploads before they reach us)
MAX_UPLOAD_FILES = 100      # per click
MAX_BURST_SECONDS = 60
MIN_BURST_INTERVAL_MS = 100
THUMBNAIL_PX = 160
UNSURE_BELOW = 0.5  # below this confidence the app says it is unsure instead of naming a product


class StudioError(ValueError):
    """A user action that cannot be done; the message is shown as is."""
