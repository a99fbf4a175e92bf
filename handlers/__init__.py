"""Operation handlers: one operation family per module, loaded through entry points."""
