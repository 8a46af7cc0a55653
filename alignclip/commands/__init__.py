"""Command-line entry points (argparse ``main(argv=None) -> int``); tools/ and console scripts call them."""
