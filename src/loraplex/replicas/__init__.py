"""Engine replicas under Ray Serve, routed by adapter: `loraplex serve --replicas N`.

- wire: what crosses Ray (a call's Job, an AdapterSource in the object store, first answers).
- replica: EngineReplica, the deployment body (engine, engine thread, its own pool).
- client / front: the API front's side (InferenceClient over the handle, leases, pool view).
- board: the replicas' reports and the front's commands (evict, unpin, forget cached KV).
- app: `build_replica_server` for the CLI and `build_app` for `serve run`.

Importing this package imports Ray; nothing below `loraplex.cli` imports it.
"""

from .app import build_app, build_replica_server

__all__ = ["build_app", "build_replica_server"]
