"""The comparison's plan (unite_core.ablations): option checks, guidance scales, and the two hashes that name
a variant's checkpoint and decide whether a table row is redone."""

import pytest

from unite_core.ablations import AblationError, check_budget, parse_scales, plan_runs


@pytest.mark.parametrize("text, want", [("1,2,3", [1.0, 2.0, 3.0]), (" 1.5 , 4", [1.5, 4.0]), ([2, "3"], [2.0, 3.0]),
                                        (None, None), ("  ", None)])
def test_parse_scales(text, want):
    assert parse_scales(text) == want


@pytest.mark.parametrize("text, match", [("1,x", "comma-separated list of numbers"), ("1,-2", "non-negative")])
def test_parse_scales_names_the_fix(text, match):
    with pytest.raises(AblationError, match=match):
        parse_scales(text)


@pytest.mark.parametrize("change, match", [
    ({"budget": "flops"}, "use one of time, steps"), ({"seeds": 0}, "--seeds=0"), ({"minutes": 0.0}, "--minutes=0.0"),
    ({"tokenizer_fraction": 1.0}, "strictly between 0 and 1"), ({"num_samples": 1}, "--samples=1 must be >= 2"),
])
def test_check_budget_refuses_each_bad_option(change, match):
    options = {"budget": "time", "minutes": 2.0, "tokenizer_fraction": 0.5, "seeds": 1, "jobs": 1, "num_samples": 10}
    check_budget(**options)  # the good options pass
    with pytest.raises(AblationError, match=match):
        check_budget(**{**options, **change})


def test_plan_hashes_separate_training_from_evaluation(tiny_cfg):
    cfg = tiny_cfg()
    plan = dict(budget="steps", minutes=1.0, steps=8, tokenizer_fraction=0.5, num_samples=20, scales=[1.0, 2.0],
                data_hash="d", classifier_hash="c")
    runs = plan_runs(cfg, ["unite", "two_stage", "unite_2x_steps"], 2, **plan)
    assert [(r.name, r.seed) for r in runs] == [(n, s) for n in ("unite", "two_stage", "unite_2x_steps")
                                                for s in (cfg.train.seed, cfg.train.seed + 1)]
    assert [r.cfg.train.steps for r in runs] == [8, 8, 8, 8, 16, 16]
    assert len({r.train_hash for r in runs}) == 6  # every variant and seed trains its own checkpoint
    again = plan_runs(cfg, ["unite", "two_stage", "unite_2x_steps"], 2, **{**plan, "num_samples": 40})
    assert [r.train_hash for r in again] == [r.train_hash for r in runs]  # the evaluation does not retrain
    assert all(a.row_hash != r.row_hash for a, r in zip(again, runs))  # but it redoes the row
    # the tokenizer share concerns the two-stage baseline only
    split = plan_runs(cfg, ["unite", "two_stage"], 1, **{**plan, "tokenizer_fraction": 0.3})
    assert split[0].train_hash == runs[0].train_hash and split[1].train_hash != runs[2].train_hash
    assert runs[0].checkpoint("models").as_posix() == f"models/compare/unite-s{cfg.train.seed}-{runs[0].train_hash}.pt"
