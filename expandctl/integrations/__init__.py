"""Optional integrations with training frameworks (each imports its framework; expandctl itself never does)."""
