"""The batched engine over one paged KV pool (issue 10)."""
