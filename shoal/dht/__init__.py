"""Who has X: signed, expiring records for model shards and weight files (not built yet)."""
