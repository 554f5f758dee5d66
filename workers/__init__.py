"""Worker roles (rollout, reward, reference, trainer, weight store) as plain classes."""
