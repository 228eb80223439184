"""The product catalogue: a SQLite-indexed, class-labelled image dataset (``python -m dataset_tools --help``)."""
from .catalogue import AddResult, Catalogue, CatalogueError, DuplicateImage, default_dir
from .imagefile import InvalidImage
from .splits import assign_splits
from .transfer import export, import_path

__all__ = ["Catalogue", "CatalogueError", "DuplicateImage", "InvalidImage", "AddResult", "default_dir", "assign_splits", "export", "import_path"]
