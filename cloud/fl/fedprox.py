"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

FedProx changes the clients, not the server: each client minimizes its local
loss plus the proximal term ``mu/2 * ||w - w_global||^2``, which keeps local
models near the global one when data and amounts of local work differ across
devices. The server aggregates exactly like FedAvg.

The proximal term therefore lives in the client's training loss. This strategy
only carries ``mu``: :meth:`FedProx.client_config` returns
``{"proximal_mu": mu}``, which the coordinator puts in the round plan's
:class:`~schemas.fl.HyperParams` (``hyperparams.model_copy(update=...)``), and
the device's trainer adds the term when ``proximal_mu > 0``.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from cloud.fl.fedavg import FedAvg
from cloud.fl.strategy import ParamValue, param_float

logger = logging.getLogger(__name__)


class FedProx(FedAvg):
    """FedAvg aggregation; clients add ``mu/2 ||w - w_global||^2`` to their loss.

    Args:
        proximal_mu: ``mu`` >= 0, sent to the clients (0 is FedAvg). There is no
            default: the paper tunes it per task in {0.001, 0.01, 0.1, 1}.
    """

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, proximal_mu: float) -> None:
        super().__init__()
        self.proximal_mu = param_float(self.name, "proximal_mu", proximal_mu, ge=0.0)

    def config(self) -> dict[str, ParamValue]:
        """The proximal coefficient."""
        return {"proximal_mu": self.proximal_mu}

    def client_config(self) -> dict[str, float]:
        """``proximal_mu`` for the round plan's hyper-parameters."""
        return {"proximal_mu": self.proximal_mu}
