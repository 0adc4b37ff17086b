"""The ``uniframe`` command line: argument parsing and rendering only; the work lives below."""
