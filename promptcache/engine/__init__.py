"""Engines: run a model over a prompt, restoring and snapshotting KV state at token offsets."""
