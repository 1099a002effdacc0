"""Test helpers: the multi-process harness (``spawn``), offline tiny pipelines (``tiny``), loading scripts (``modules``)."""
