"""Training, background jobs and evaluation: catalogue -> checkpoint (``python -m training --help``)."""
