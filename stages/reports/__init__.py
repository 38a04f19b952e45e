"""The files a stage writes that take more than a few lines (tables, plots), one module per stage, named
after it: stages/reports/<stage>.py is imported by stages/<stage>.py alone (tests/test_layers.py)."""
