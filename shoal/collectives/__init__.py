"""Fault-tolerant all-reduce over libp2p streams (not built yet)."""
