"""Tests of the Anthropic Messages adapter."""
