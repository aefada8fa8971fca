"""Prefect flows: they only chain tasks. `retrain` is the main job."""
