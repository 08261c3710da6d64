"""`make bench`: the broker measured side by side with the ceilings of its own stack."""
