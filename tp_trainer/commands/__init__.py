"""One module per ``tp-trainer`` command; each has ``HELP`` and ``main(argv) -> int``."""
