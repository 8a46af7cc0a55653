"""Command-line entry points: each module's ``main(argv=None) -> int`` (tools/ and the alignclip-* scripts call them)."""
