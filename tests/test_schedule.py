import pytest

from sit_core import SlimSchedule, as_schedule


def test_reference_token_counts_at_224():
    # docs/method.md: 196 -> 98 -> 49 -> 24 for three TSMs keeping 0.5.
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


# --- ToMe's own form, the in-block reducers, the paper table --------------------------------------

from sit_core.schedule import PAPER_SCHEDULES, SIT_LVVIT_VARIANTS, paper_schedule  # noqa: E402


@pytest.mark.parametrize("text", ["merge:r13", "r13", "drop:4,7,10@0.7+fuse", "tsm:3,6,9@0.7,0.6,0.5", "merge:3,6,9@0.7"])
def test_every_cli_form_round_trips(text):
    s = SlimSchedule.parse(text)
    assert SlimSchedule.parse(str(s)) == s
    assert as_schedule(s.to_dict()) == s
    assert as_schedule(str(s)) == s


def test_tome_r_form():
    s = SlimSchedule.parse("merge:r13")
    assert (s.reducer, s.r, s.positions, s.keep, str(s)) == ("merge", 13, (), (), "merge:r13")
    assert s.to_dict() == {"positions": [], "keep": [], "reducer": "merge", "r": 13}
    assert s.per_block and s.in_block and not s.is_identity
    # DeiT-S at 224: 196 patches, 13 merged in every one of the 12 blocks -> 40 left (ToMe: 197 -> 41 with the class token)
    assert s.block_out_tokens(12, 196) == [196 - 13 * i for i in range(1, 13)]
    assert s.block_tokens(12, 196)[:3] == [196, 183, 170]
    assert s.reducing_blocks(12) == tuple(range(1, 13))
    # ToMe's cap: one round removes at most half (r = min(r, n // 2))
    assert SlimSchedule(reducer="merge", r=13).block_out_tokens(4, 16) == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="use block_tokens"):
        s.stage_tokens(196)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reducer="tsm", r=13), "r=13 (tokens merged in every block) needs reducer='merge'"),
    (dict(reducer="merge", r=13, positions=(3,), keep=0.5), "give either r=13"),
    (dict(reducer="merge", r=-1), "r=-1 is out of range"),
])
def test_invalid_r_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SlimSchedule(**kwargs)
    with pytest.raises(ValueError, match="must look like 'merge:r13'"):
        SlimSchedule.parse("merge:rx")


def test_in_block_reducers_may_reduce_in_the_last_block_tsm_may_not():
    SlimSchedule((12,), 0.5, "drop").validate_for(depth=12, num_patches=196)
    with pytest.raises(ValueError, match="valid positions are 1..11"):
        SlimSchedule((12,), 0.5, "tsm").validate_for(depth=12, num_patches=196)
    with pytest.raises(ValueError, match=r"at least 2 must be left \(one kept, one fused\)"):
        SlimSchedule((1,), 0.1, "drop", fuse_dropped=True).validate_for(depth=4, num_patches=16)


def test_block_out_tokens_is_block_tokens_shifted():
    s = SlimSchedule((2, 4), 0.5)
    assert s.block_out_tokens(6, 64) == [64, 32, 32, 16, 16, 16]
    assert s.block_tokens(6, 64) == [64] + s.block_out_tokens(6, 64)[:-1]


def test_paper_table_is_the_spec():
    spec_lvvit = {  # table in docs/method.md: variant -> (teacher backbone, depth, TSM after)
        "tiny": ("lvvit_tiny", 14, (1, 2, 3)), "xsmall": ("lvvit_small", 16, (1, 2, 3)),
        "small": ("lvvit_small", 16, (9, 12, 14)), "medium": ("lvvit_medium", 20, (10, 14, 17)),
        "large": ("lvvit_large", 24, (10, 14, 17)),
    }
    for v in SIT_LVVIT_VARIANTS:
        row = PAPER_SCHEDULES[f"sit_lvvit_{v}"]
        assert (row.backbone, row.depth, row.schedule.positions) == spec_lvvit[v]
        assert row.schedule == SlimSchedule(spec_lvvit[v][2], 0.5, "tsm")
    assert paper_schedule("deit_flop_matched") == SlimSchedule.parse("3,6,9@0.7")
    assert paper_schedule("evit_deit_small") == SlimSchedule.parse("drop:4,7,10@0.7+fuse")
    assert paper_schedule("tome_deit_small") == SlimSchedule.parse("merge:r13")
    with pytest.raises(ValueError, match="unknown paper schedule 'nope'"):
        paper_schedule("nope")


def test_labels_say_which_method_and_whether_it_is_its_own_form():
    assert "ToMe's own schedule" in paper_schedule("tome_deit_small").describe()
    assert "SiT-position adaptation" in SlimSchedule.parse("merge:3,6,9@0.7").describe()
    assert "EViT" in paper_schedule("evit_deit_small").describe() and "fused" in paper_schedule("evit_deit_small").describe()
    assert paper_schedule("deit_flop_matched").describe().startswith("SiT TSM after blocks 3,6,9")


@pytest.mark.parametrize("depth, expected", [(12, (3, 6, 9)), (6, (1, 3, 4)), (24, (6, 12, 18)), (4, (1, 2, 3)), (3, (1, 2))])
def test_deit_schedule_scaled_to_other_depths(depth, expected):
    s = PAPER_SCHEDULES["deit_flop_matched"].scaled_to(depth)
    assert s.positions == expected and set(s.keep) == {0.7} and s.reducer == "tsm"
    s.validate_for(depth, 196)
    assert PAPER_SCHEDULES["tome_deit_small"].scaled_to(6) == paper_schedule("tome_deit_small")
