"""Test helpers: the multi-process harness (``spawn``) and offline tiny pipelines (``tiny``)."""
