"""Tests of the HTTP adapters."""
