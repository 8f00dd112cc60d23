"""Scaling-law sweeps: IsoFLOP sweep configs (run by experiments/studies/sweep.py)."""
