"""Engine services behind small protocols: serving, parallelism, flow-matching policies."""
