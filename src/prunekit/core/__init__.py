"""The core every family is a thin layer on: masks, allocation, registries, configs (see docs/ARCHITECTURE.md)."""
