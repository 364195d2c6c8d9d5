"""The test tiers hold (tests/conftest.py): a unit test cannot train or start a process
unnoticed, and every multi-process or end-to-end test is in the launched tier."""

import subprocess
import sys

import pytest

from wlora_dist.training.trainer import Trainer


def test_a_unit_test_that_sets_up_a_trainer_fails_naming_the_marker_it_needs():
    with pytest.raises(pytest.fail.Exception, match=r"mark it @pytest.mark.inprocess"):
        Trainer.setup(None)  # refused before the trainer is touched


def test_a_unit_test_that_starts_python_fails_naming_the_marker_it_needs():
    with pytest.raises(pytest.fail.Exception, match=r"mark it @pytest.mark.launched"):
        subprocess.Popen([sys.executable, "-c", "pass"])


@pytest.mark.inprocess
def test_an_inprocess_test_may_set_up_a_trainer_but_not_start_python():
    with pytest.raises(AttributeError):  # past the guard: the trainer itself fails on None
        Trainer.setup(None)
    with pytest.raises(pytest.fail.Exception, match=r"mark it @pytest.mark.launched"):
        subprocess.Popen([sys.executable, "-c", "pass"])


def test_every_test_has_one_tier_and_dist_and_e2e_are_launched(request):
    tiers = ("unit", "inprocess", "launched")
    for item in request.session.items:
        marks = {m.name for m in item.iter_markers()}
        assert marks & set(tiers), item.nodeid
        if marks & {"dist", "e2e"}:
            assert "launched" in marks, item.nodeid
        if "unit" in marks:
            assert not marks & {"inprocess", "launched", "dist", "e2e", "slow"}, item.nodeid
