"""pytest configuration: the test helpers live in tests/helpers.py (imported as a module)."""
