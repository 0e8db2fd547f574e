import pytest
from pydantic import ValidationError

from prunepilot.errors import PlanError
from prunepilot.plan import Plan


def test_unknown_keys_rejected():
    with pytest.raises(ValidationError):
        Plan.model_validate({"ratios": {}, "learning_rate": 0.1})


def test_ratio_range_and_regex_validated():
    with pytest.raises(ValidationError):
        Plan(ratios={"a": 1.5})
    with pytest.raises(ValidationError):
        Plan(ratios={"re:([": 0.2})


def test_precedence_exact_regex_family_default():
    p = Plan(ratios={"layer1.0.conv1": 0.1, "re:^layer1": 0.2, "layer*.*.conv1": 0.3}, default_ratio=0.4)
    assert p.ratio_for("layer1.0.conv1", "layer*.*.conv1") == 0.1
    assert p.ratio_for("layer1.1.conv1", "layer*.*.conv1") == 0.2
    assert p.ratio_for("layer2.1.conv1", "layer*.*.conv1") == 0.3
    assert p.ratio_for("layer2.1.conv2", "layer*.*.conv2") == 0.4


def test_unknown_names_are_errors():
    p = Plan(ratios={"layer9.conv": 0.2})
    with pytest.raises(PlanError, match="does not have"):
        p.check_names(["layer1.conv"], ["layer*.conv"])
    with pytest.raises(PlanError, match="regex"):
        Plan(ratios={"re:^nothing": 0.2}).check_names(["layer1.conv"], [])
    Plan(ratios={"re:^layer": 0.2, "layer*.conv": 0.1}).check_names(["layer1.conv"], ["layer*.conv"])


def test_from_json_text_error_is_clear():
    with pytest.raises(PlanError, match="Plan schema"):
        Plan.from_json_text('{"ratios": {"a": "lots"}}')


def test_plan_params_must_be_finite():
    import math

    import pytest
    from pydantic import ValidationError

    from prunepilot.plan import Plan

    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValidationError, match="finite"):
            Plan(params={"tilt": bad})
    assert Plan(params={"tilt": 0.5}).params == {"tilt": 0.5}


def test_no_stagnation_note_when_nothing_was_scored():
    from prunepilot.attempt import Attempt
    from prunepilot.jobs.prune import divergence_guidance

    failed = [Attempt(index=i, job="prune", verdict="failed", error="boom") for i in range(5)]
    assert not any("stagnation" in n for n in divergence_guidance(failed))
