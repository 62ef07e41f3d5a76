"""The OpenAI-compatible HTTP API: inference tagged with adapters, adapter upload, tenants, metrics.

Empty until the serving issue; the package exists so that the layering contract holds from day one.
"""
