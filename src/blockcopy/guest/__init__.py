"""A tiny Linux guest for end-to-end tests and the demo: see build.py and writer.c."""
