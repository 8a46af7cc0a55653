"""Command-line entry points: each module's ``main(argv=None) -> int``, called by tools/ and the alignclip-* scripts."""
