"""``blockcopy serve``: one daemon that owns the QMP connections and serves an HTTP API.

Layers, each only translating: :mod:`.daemon` (domains, job tasks, recovery at start) over the same
manager, driver, protocol and journal the CLI uses; :mod:`.api` (HTTP resources and errors);
:mod:`.server` (sockets, peer checks, TLS, systemd); :mod:`.client` (the CLI's side, stdlib only so
that a command starts fast).
"""
