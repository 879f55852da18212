"""HTTP adapters: one package per wire protocol, plus the Starlette app and shared SSE helpers."""
