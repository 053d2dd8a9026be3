"""Which epoch's weights a trial keeps: the best by the search's metric, or the last epoch's (keep: last)."""

import operator

import pytest
import torch

from xray_ray.search.trial_loop import TrialState


def _state() -> TrialState:
    return TrialState(torch.nn.Linear(2, 1), None, None, None, None, swa_from=99)


@pytest.mark.parametrize(("keep", "kept_epoch"), [("best", 1), ("last", 3)])
def test_keep_best_or_last(keep, kept_epoch):
    state = _state()
    nets = {}
    for epoch, metric in ((1, 0.9), (2, 0.7), (3, 0.8)):
        net = torch.nn.Linear(2, 1)
        nets[epoch] = net
        state.keep_if_better(metric, epoch, net, operator.gt, keep)
    assert state.best_epoch == kept_epoch
    assert state.best == {1: 0.9, 3: 0.8}[kept_epoch]
    assert torch.equal(state.best_state["weight"], nets[kept_epoch].weight.detach())


def test_keep_metric_is_checked_and_never_enters_the_trial_seed():
    from xray_ray.config import TrialConfig
    from xray_ray.errors import UserError
    from xray_ray.search.trial import trial_seed

    base = TrialConfig.from_dict({"image_size": 32, "blocks": 2})
    assert trial_seed(base) == trial_seed(base.replace(keep_metric="rob_loss_mean"))
    assert trial_seed(base) != trial_seed(base.replace(keep="last"))
    with pytest.raises(UserError, match="keep_metric"):
        TrialConfig.from_dict({"image_size": 32, "blocks": 2, "keep_metric": "val_f1"})
    with pytest.raises(UserError, match="keep: last"):
        TrialConfig.from_dict({"image_size": 32, "blocks": 2, "keep": "last", "keep_metric": "val_auc"})


def test_keep_metric_names_exactly_the_metrics_a_space_may_name():
    from typing import get_args

    from xray_ray.config import KeepMetric
    from xray_ray.search.spaces import METRICS

    assert set(get_args(KeepMetric)) == {"", *METRICS}
