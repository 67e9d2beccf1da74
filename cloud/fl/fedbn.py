"""FedBN: clients keep their batch normalization (Li et al. 2021).

Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization". Batch-normalization parameters and statistics stay on the devices: they are
neither averaged nor sent with the global model, so each client keeps the
normalization fitted to its own feature distribution. Everything else is
averaged like FedAvg.

A parameter is local when:

- a segment of its dotted name is a batch-norm statistic (``running_mean``,
  ``running_var``, ``num_batches_tracked``) or names a batch-norm layer
  (``bn``, ``bn1``, ``bn_2``, ``batchnorm``, ``batch_norm``, ``BatchNorm2d``, ...);
- it belongs to a module that has batch-norm statistics (so the ``weight`` and
  ``bias`` of torchvision's ``layer1.0.downsample.1`` are local because
  ``layer1.0.downsample.1.running_mean`` exists);
- or it is listed in ``local_names``, as a full name or a module prefix.

The coordinator publishes only :meth:`FedBN.shared_names` of the new global
weights; :meth:`FedBN.finalize` returns the server's unchanged copies of the
local names so that its model stays complete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import ClassVar, Final

from cloud.fl.fedavg import FedAvg
from cloud.fl.strategy import ParamValue, param_names

logger = logging.getLogger(__name__)

BN_STATISTICS: Final = frozenset({"running_mean", "running_var", "num_batches_tracked"})
BN_LAYER: Final = re.compile(r"^(bn|batch_?norm(\d*d)?)(_?\d+)*$", re.IGNORECASE)
_SEGMENT: Final = re.compile(r"[./:]")


def is_batch_norm(name: str) -> bool:
    """Whether a parameter name identifies a batch-norm layer or statistic."""
    return any(
        segment in BN_STATISTICS or BN_LAYER.match(segment) for segment in _SEGMENT.split(name)
    )


def _module(name: str) -> str:
    return name.rpartition(".")[0]


class FedBN(FedAvg):
    """FedAvg over everything but batch normalization, which clients keep.

    Args:
        local_names: more parameters to keep local: full names or module prefixes
            (``"head.norm"`` covers ``head.norm.weight``).
    """

    name: ClassVar[str] = "fedbn"

    def __init__(self, *, local_names: Sequence[str] = ()) -> None:
        super().__init__()
        self.local_names = param_names(self.name, "local_names", local_names)

    def config(self) -> dict[str, ParamValue]:
        """The extra local names."""
        return {"local_names": list(self.local_names)}

    def is_local(self, name: str, bn_modules: frozenset[str] = frozenset()) -> bool:
        """Whether ``name`` stays on the clients (``bn_modules``: modules with statistics)."""
        if is_batch_norm(name) or (_module(name) and _module(name) in bn_modules):
            return True
        return any(name == local or name.startswith(f"{local}.") for local in self.local_names)

    def shared_names(self, names: Iterable[str]) -> list[str]:
        """The names averaged and sent: all but batch normalization and ``local_names``."""
        names = list(names)
        bn_modules = frozenset(
            _module(n) for n in names if n.rpartition(".")[2] in BN_STATISTICS and _module(n)
        )
        shared = [n for n in names if not self.is_local(n, bn_modules)]
        logger.debug("%s: %d of %d parameters shared", self.name, len(shared), len(names))
        return shared
