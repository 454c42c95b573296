"""Engines: library functions that take a config dataclass and return a result dataclass.

The CLI only parses, calls an engine and prints; everything here is usable from Python.
"""
