"""Storage backends: where the bytes of rows live. `memory` (storage-unit actors) today."""
