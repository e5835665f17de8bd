"""Settings of ``mechscope serve`` (no web framework needed to read them: the CLI derives its flags here)."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from mechscope.errors import BadInputError

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``mechscope serve``.

    Attributes:
        directory: folder whose ``*.json`` graphs are served (recursively); ``mechscope trace``
            writes to ``./graphs``.
        host: interface to bind; the loopback ``127.0.0.1`` keeps the explorer private to this
            machine. Any other address lets every machine that reaches it read and save the graphs.
        port: TCP port, 1-65535.
        max_body_mb: largest request body accepted (a saved graph), in MiB, > 0.
        store: a feature store for the node cards of every graph traced with the transcoder set it
            was built for (other graphs' cards say so); None finds each graph's store by its set.

    Raises:
        BadInputError: a port outside 1-65535, a body limit that is not a finite number > 0, an
            empty host, or a ``store`` file that does not exist.
    """

    directory: Path = Path("graphs")
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_mb: float = 64.0
    store: Path | None = None

    def __post_init__(self):
        if not 1 <= self.port <= 65535:
            raise BadInputError(f"port {self.port} is out of range; give 1-65535")
        if not 0 < self.max_body_mb < math.inf:
            raise BadInputError(f"max_body_mb {self.max_body_mb} must be a finite number > 0 (MiB)")
        if not self.host:
            raise BadInputError("host is empty; give an address such as 127.0.0.1")
        if self.store is not None and not Path(self.store).is_file():
            raise BadInputError(f"feature store {str(self.store)!r} does not exist; give the .sqlite that "
                                "`mechscope features build` wrote, or leave --store out")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def loopback(self) -> bool:
        """Whether ``host`` is a loopback address or ``localhost``."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
