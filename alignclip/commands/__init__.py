"""Command-line entry points (``alignclip-<name>``); ``tools/<name>.py`` are thin wrappers around them."""
