"""Model definition, loading, pipeline-parallel serving and routing (not built yet)."""
