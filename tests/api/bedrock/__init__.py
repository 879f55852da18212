"""Tests of the Amazon Bedrock runtime adapter."""
