import pytest

from sit_core import SlimSchedule, as_schedule


def test_reference_token_counts_at_224():
    # SPEC: 196 -> 98 -> 49 -> 24 for three TSMs keeping 0.5.
    assert SlimSchedule((1, 2, 3), 0.5).stage_tokens(196) == [196, 98, 49, 24]
    assert SlimSchedule((3, 6, 9), 0.7).stage_tokens(196) == [196, 137, 96, 67]


def test_block_tokens_counts_what_enters_each_block():
    s = SlimSchedule((2, 4), (0.5, 0.5))
    assert s.block_tokens(6, 64) == [64, 64, 32, 32, 16, 16]


def test_one_ratio_or_one_per_stage():
    assert SlimSchedule((3, 6, 9), 0.7).keep == (0.7, 0.7, 0.7)
    assert SlimSchedule((3, 6), (0.8, 0.5)).keep == (0.8, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(positions=(3, 6), keep=1.5), "keep ratio 1.5 is out of range: must be in (0, 1]"),
    (dict(positions=(3, 6), keep=0.0), "keep ratio 0.0 is out of range"),
    (dict(positions=(6, 3), keep=0.5), "strictly increasing (found 6 then 3)"),
    (dict(positions=(3, 3), keep=0.5), "strictly increasing (found 3 then 3)"),
    (dict(positions=(0, 3), keep=0.5), "slimming position 0 is out of range"),
    (dict(positions=(3, 6), keep=(0.5, 0.5, 0.5)), "keep has 3 ratios for 2 positions"),
    (dict(positions=(3,), keep=0.5, reducer="prune"), "reducer='prune' is not one of tsm, drop, merge, none"),
])
def test_invalid_schedules_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError) as e:
        SlimSchedule(**kwargs)
    assert message in str(e.value)


def test_schedule_model_mismatch():
    with pytest.raises(ValueError, match=r"position 12 is out of range for a 12-block model: valid positions are 1..11"):
        SlimSchedule((3, 12), 0.5).validate_for(depth=12, num_patches=196)
    with pytest.raises(ValueError, match=r"would keep 0 of 16 patch tokens: at least 1 must be left"):
        SlimSchedule((1, 2, 3), 0.1).validate_for(depth=12, num_patches=16)


def test_parse_and_round_trip():
    s = SlimSchedule.parse("drop:3,6,9@0.7,0.6,0.5")
    assert (s.reducer, s.positions, s.keep) == ("drop", (3, 6, 9), (0.7, 0.6, 0.5))
    assert as_schedule(s.to_dict()) == s
    assert as_schedule(str(s)) == s
    with pytest.raises(ValueError, match="must look like '3,6,9@0.7'"):
        SlimSchedule.parse("3,6,9")


def test_keyword_overrides_default():
    base = SlimSchedule((3, 6, 9), 0.7)
    assert as_schedule(None, keep=0.5, default=base) == SlimSchedule((3, 6, 9), 0.5)
    assert as_schedule(None, reducer="none", default=base).is_identity
    assert as_schedule(None, positions=(4, 8), default=base) == SlimSchedule((4, 8), 0.7)
