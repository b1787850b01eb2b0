"""The conformance kit for device developers (docs/conformance.md)."""
