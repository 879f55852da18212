"""Protocol-neutral types shared by api, service, cache and engine."""
