"""Network-namespace NAT topology and node helpers for tests/test_nat.py (root only)."""
