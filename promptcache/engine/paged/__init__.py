"""The batched engine over one paged KV pool: ``PagedEngine`` (the step loop and scheduler),
``KVPool`` and its payloads, ``PagedAttention``, ``PagedCodec``, and the lean model code."""
