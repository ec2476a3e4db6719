"""What is true now: the replicated pycrdt swarm document (not built yet)."""
