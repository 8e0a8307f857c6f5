"""Strategy names -> strategy classes (the names are the valid values of ``strategy``)."""

from __future__ import annotations

from common.config import STRATEGY_NAMES, RunConfig
from server_app.baselines import AllSmallStrategy, ExclusiveFLStrategy, OortStrategy, TiFLStrategy
from server_app.depthfl import DepthFLStrategy
from server_app.fedll import FedLLStrategy
from server_app.heterofl import HeteroFLStrategy
from server_app.outputs import RunRecorder
from server_app.profl import ProFLStrategy
from server_app.smartfreeze import SmartFreezeStrategy
from server_app.strategy import FedAvgStrategy

STRATEGIES: dict[str, type[FedAvgStrategy]] = {
    "fedavg": FedAvgStrategy,
    "smartfreeze": SmartFreezeStrategy,
    "exclusivefl": ExclusiveFLStrategy,
    "allsmall": AllSmallStrategy,
    "tifl": TiFLStrategy,
    "oort": OortStrategy,
    "heterofl": HeteroFLStrategy,
    "depthfl": DepthFLStrategy,
    "fedll": FedLLStrategy,
    "profl": ProFLStrategy,
}

if set(STRATEGIES) != set(STRATEGY_NAMES):
    raise RuntimeError(f"strategy registry {sorted(STRATEGIES)} and config choices {sorted(STRATEGY_NAMES)} disagree")


def build_strategy(cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> FedAvgStrategy:
    """Instantiate the strategy named by ``cfg.strategy``."""
    return STRATEGIES[cfg.strategy](cfg, recorder, num_classes)
