"""Scaling-law sweeps: IsoFLOP sweep configs and the runner (experiments/scaling/sweep.py)."""
