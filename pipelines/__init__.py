"""One pipeline per model, each composing library steps (see docs/architecture.md)."""
