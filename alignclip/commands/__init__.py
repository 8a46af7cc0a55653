"""Command-line entry points: each module's ``main(argv=None) -> int`` (tools/<name>.py and alignclip-<name>)."""
