"""Example user models for ``probe analyze --model examples.<module>:<factory>`` (not part of probe)."""
