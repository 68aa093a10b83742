"""The test suite; tests/README.md maps each module of the package to its tests."""
