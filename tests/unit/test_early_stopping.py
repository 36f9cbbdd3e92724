"""The median stopping rule between sibling trials of a sweep, through their eval_history.json files."""

from __future__ import annotations

import pytest

from orchestrator import early_stopping
from orchestrator.errors import UserError
from tests.conftest import compose_run


def test_a_trial_stops_only_when_worse_than_the_median_of_enough_peers():
    assert early_stopping.should_stop(2.0, [1.0, 1.5], "min")
    assert not early_stopping.should_stop(1.2, [1.0, 1.5], "min")  # median 1.25
    assert not early_stopping.should_stop(9.0, [1.0], "min")  # one peer is not enough to judge
    assert early_stopping.should_stop(0.2, [0.5, 0.6, 0.1], "max")
    assert not early_stopping.should_stop(0.5, [0.5, 0.6, 0.1], "max")  # equal to the median: keep going


def test_trials_compare_notes_through_their_sibling_directories(tmp_path):
    for num, loss in (("0", 1.0), ("1", 1.4)):
        (tmp_path / num).mkdir()
        early_stopping.record(str(tmp_path / num), 4, loss)
    (tmp_path / "2").mkdir()
    assert sorted(early_stopping.peers_at(str(tmp_path / "2"), 4)) == [1.0, 1.4]
    assert early_stopping.peers_at(str(tmp_path / "2"), 6) == []  # nobody got there yet
    assert early_stopping.decide(str(tmp_path / "2"), 4, 2.0, "min")
    assert not early_stopping.decide(str(tmp_path / "0"), 4, 1.0, "min")  # its own file is not a peer
    assert early_stopping.read_history(str(tmp_path / "2" / early_stopping.HISTORY_FILE)) == {4: 2.0}
    assert not early_stopping.decide(str(tmp_path / "2"), 6, None, "min")  # metric missing: never stop


def test_early_stopping_needs_evaluations(tmp_path):
    with pytest.raises(UserError, match="trainer.early_stopping=True is not allowed: true only with trainer.eval"):
        compose_run(["trainer.early_stopping=true", "trainer.eval_every=0"], tmp_path)  # (null: once per epoch)
