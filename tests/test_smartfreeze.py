"""SmartFreeze server-side pieces that need no Flower run: warm start of output modules."""

import numpy as np
import pytest

from common.models import build_model
from common.output_modules import build_output_modules
from common.training import state_to_numpy
from server_app.smartfreeze import warm_start_arrays


@pytest.mark.parametrize("name", ["resnet10", "vgg11bn", "smallcnn"])
def test_warm_start_carries_later_layers_and_classifier(name: str) -> None:
    model = build_model(name, 10, 0.25, seed=0)
    oms = build_output_modules(model, seed=1)
    arrays = {**state_to_numpy(model), **{f"outmod.{k}": v for k, v in state_to_numpy(oms).items()}}
    blocks = model.num_blocks
    for stage in range(1, blocks):
        new = warm_start_arrays(arrays, stage, blocks)
        prev = f"outmod.{stage - 1}."
        if stage == blocks - 1:
            np.testing.assert_array_equal(new["head.2.weight"], arrays[prev + "classifier.2.weight"])
            assert not any(k.startswith("outmod.") for k in new)
        else:
            np.testing.assert_array_equal(new[f"outmod.{stage}.classifier.2.bias"], arrays[prev + "classifier.2.bias"])
            np.testing.assert_array_equal(new[f"outmod.{stage}.convs.0.weight"], arrays[prev + "convs.3.weight"])
            own = {k for k in arrays if k.startswith(f"outmod.{stage}.")}
            assert set(new) == own  # every layer of the new module is initialised
        assert all(new[k].shape == arrays[k].shape for k in new)


def test_warm_start_after_a_message_roundtrip_keeps_shapes() -> None:
    from common import protocol as P

    model = build_model("smallcnn", 10, 0.25, seed=0)
    oms = build_output_modules(model, seed=1)
    arrays = {**state_to_numpy(model), **{f"outmod.{k}": v for k, v in state_to_numpy(oms).items()}}
    roundtrip = P.from_record(P.to_record({k: v for k, v in arrays.items() if k.startswith("outmod.0.")}))
    assert roundtrip["outmod.0.convs.1.num_batches_tracked"].shape == (1,)  # what Flower delivers
    from server_app.strategy import FedAvgStrategy

    holder = FedAvgStrategy.__new__(FedAvgStrategy)
    holder.arrays = dict(arrays)
    holder.merge(roundtrip)
    assert holder.arrays["outmod.0.convs.1.num_batches_tracked"].shape == ()
    new = warm_start_arrays(holder.arrays, 1, model.num_blocks)
    assert new["outmod.1.convs.1.num_batches_tracked"].shape == ()
