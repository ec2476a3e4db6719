"""DiLoCo and fine-tuning over the collectives (not built yet)."""
