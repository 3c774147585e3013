"""The storage layer, one concern per module (docs/architecture.md, "Storage layer")."""
