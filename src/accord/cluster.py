"""Instance identity: ids that stay unique across the cluster while instances live."""

from __future__ import annotations

import os
import socket
import uuid


def new_instance_id() -> str:
    """A readable id, unique per live instance: host, process id and a random suffix."""
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
