"""The operators' web UI: tenants, adapters, the GPU pool and live load, each page with a JSON twin.

Empty until the admin UI issue; the package exists so that the layering contract holds from day one.
"""
