"""The components `flwr run` loads: leaklab's audited ServerApp and its ClientApp."""

from leaklab.fl.client import client_app
from leaklab.fl.server import server_app

__all__ = ["client_app", "server_app"]
