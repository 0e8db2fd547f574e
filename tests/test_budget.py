import pytest

from prunepilot.budget import Band, Budget, parse_target
from prunepilot.errors import BudgetError


@pytest.mark.parametrize("metric,text,value,relative", [
    ("macs", "1.77G", 1.77e9, False),
    ("macs", "45%", 0.45, True),
    ("params", "10M", 1e7, False),
    ("params", "2.5e6", 2.5e6, False),
    ("latency_ms", "20ms", 20.0, False),
    ("latency_ms", "0.02s", 20.0, False),
    ("memory_mb", "1GB", 1024.0, False),
    ("sparsity", "50%", 0.5, False),
    ("sparsity", "0.45", 0.45, False),
])
def test_parse_target(metric, text, value, relative):
    t = parse_target(metric, text)
    assert t.value == pytest.approx(value)
    assert t.relative is relative


@pytest.mark.parametrize("metric,text,fragment", [
    ("macs", "lots", "k/M/G/T"),
    ("macs", "150%", "(0%, 100%]"),
    ("macs", "0", "positive"),
    ("latency_ms", "20 parsecs", "unit"),
    ("sparsity", "1.5", "[0, 1)"),
])
def test_parse_errors_say_rule_and_fix(metric, text, fragment):
    with pytest.raises(BudgetError) as exc:
        parse_target(metric, text)
    msg = str(exc.value)
    assert fragment in msg and "fix:" in msg and text.strip() in msg


def test_band_parse_and_default():
    assert Band.parse("+1%/-5%") == Band(over=0.01, under=0.05)
    assert Band.parse("2%") == Band(over=0.02, under=0.02)
    with pytest.raises(BudgetError):
        Band.parse("plus one")


def test_resolve_relative_and_band():
    rb = Budget.parse(macs="50%", params="2M").resolve({"macs": 4e9, "params": 10e6})
    assert rb.goals == {"macs": 2e9, "params": 2e6}
    assert rb.within("macs", 2.019e9) and not rb.within("macs", 2.03e9)
    assert rb.within("macs", 1.91e9) and not rb.within("macs", 1.89e9)
    assert rb.error("macs", 2.2e9) == pytest.approx(0.1)


def test_target_above_dense_is_an_error():
    with pytest.raises(BudgetError, match="below the dense"):
        Budget.parse(macs="5G").resolve({"macs": 4e9, "params": 1})


def test_empty_and_duplicate_budgets():
    with pytest.raises(BudgetError, match="at least one target"):
        Budget.parse()


@pytest.mark.parametrize("metric,text,value", [
    ("size_mb", "under 100 MB", 100.0), ("macs", "1.77 GMACs", 1.77e9), ("latency_ms", "<= 20 ms", 20.0),
    ("params", "10M params", 1e7), ("memory_mb", "\u2264 1.5 GB", 1536.0), ("sparsity", "at least 50% sparsity", 0.5),
])
def test_budgets_as_people_write_them(metric, text, value):
    assert parse_target(metric, text).value == pytest.approx(value)


@pytest.mark.parametrize("metric,text,needle", [
    ("macs", "3.5 GFLOPs", "MACs"), ("size_mb", "at least 30 MB", "cap"), ("sparsity", "under 50%", "floor"),
])
def test_budget_phrasings_that_mean_something_else_are_refused(metric, text, needle):
    with pytest.raises(BudgetError, match=needle):
        parse_target(metric, text)
