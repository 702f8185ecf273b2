"""Attacks: one counted core (Victim) and the searches on it: UAT, HotFlip, GCG."""
