"""sessionq test suite (a package so workers can import ``tests.activities``)."""
