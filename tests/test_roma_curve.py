"""scripts/roma_curve.py: the sweep end to end on a small grid, its choice of settings on val_unseen only,
its test rows (one per final setting and seed), its intervals and its picture."""

import collections
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import roma_curve  # noqa: E402

from moe_local import demo  # noqa: E402


def test_stratified_sample_is_even_across_families_and_seeded():
    train, _ = demo.load_split("train")
    pick = roma_curve.stratified_sample(train, 24, seed=0)
    assert len(set(pick)) == 24
    assert set(collections.Counter(train[i].task for i in pick).values()) == {4}  # 6 families
    assert (pick == roma_curve.stratified_sample(train, 24, seed=0)).all()
    assert not (pick == roma_curve.stratified_sample(train, 24, seed=1)).all()
    assert set(roma_curve.stratified_sample(train, 1200, seed=3)) == set(range(1200))


def test_intervals():
    rng = np.random.default_rng(0)
    draws = roma_curve.bootstrap_draws(3, 4, 500, rng)
    same = np.ones((3, 4))
    assert roma_curve.interval(same, draws) == (100.0, 100.0, 100.0)
    assert roma_curve.interval(same, draws, same) == (0.0, 0.0, 0.0)  # paired: identical methods differ by 0
    hits = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=float)
    mean, lo, hi = roma_curve.interval(hits, draws)
    assert mean == 50.0 and 0.0 <= lo < 50.0 < hi <= 100.0
    # a draw's mean: over the drawn seeds, of the one draw of items they share (all seeds saw the same items)
    seed_pick, sample_pick = draws
    by_hand = np.mean([hits[s][sample_pick[0, 0]].mean() for s in seed_pick[0]])
    assert roma_curve.bootstrap_mean(hits, draws)[0] == pytest.approx(by_hand)


@pytest.mark.slow
def test_sweep_runs_end_to_end_on_a_small_grid(tmp_path, capsys, monkeypatch):
    out, picture = tmp_path / "curve.json", tmp_path / "curve.png"
    splits = {len(demo.load_split(s)[0]): s for s in ("val_unseen", "test_unseen")}
    calls = []  # the split of every evaluation, in order

    def recorded(model, records, *args, **kwargs):
        calls.append(splits[len(records)])
        return evaluate(model, records, *args, **kwargs)

    evaluate = roma_curve.evaluate
    monkeypatch.setattr(roma_curve, "evaluate", recorded)
    args = ["--models", "tiny", "--sizes", "24", "--seeds", "0", "1", "--lams", "0.3", "3", "--max-steps", "2"]
    args += ["--c3po-k", "3", "--c3po-sigma", "0.2", "0.4", "--bootstrap", "200"]
    assert roma_curve.main(["--out", str(out), "--plot", str(picture), *args]) == 0
    printed = capsys.readouterr().out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(out.read_text())
    val, test = runs["val"], runs["test"]
    # every setting on val: base, router and roma at λ 0.3 and 3 after 1 and 2 epochs, c3po at two σ
    for seed in (0, 1):
        mine = [r for r in val if r["seed"] == seed]
        assert collections.Counter(r["method"] for r in mine) == {"base": 1, "router": 2, "roma": 4, "c3po": 2}
    assert {r["split"] for r in val} == {"val_unseen"} and {r["split"] for r in test} == {"test_unseen"}
    # test: once per final setting and seed, the setting with the best mean val accuracy of its group
    groups = ("base", "router", "roma", "c3po", "roma@0.3", "roma@3")
    assert collections.Counter(r["group"] for r in test) == {g: 2 for g in groups}
    for group in groups:
        method, _, lam = group.partition("@")
        means = collections.defaultdict(list)
        for r in val:
            if r["method"] == method and (not lam or r["lam"] == float(lam)):
                means[roma_curve.setting_key(r)].append(r["accuracy"])
        best = max(np.mean(v) for v in means.values())
        chosen = {json.dumps(r["setting"], sort_keys=True) for r in test if r["group"] == group}
        assert len(chosen) == 1 and np.mean(means[chosen.pop()]) == best
    # test_unseen is read after every choice is made, once per distinct chosen setting and seed
    first_test = calls.index("test_unseen")
    assert set(calls[first_test:]) == {"test_unseen"} and calls[:first_test].count("val_unseen") == len(val)
    distinct = {(r["seed"], json.dumps(r["setting"], sort_keys=True)) for r in test}
    assert calls.count("test_unseen") == len(distinct)
    for r in test:
        assert len(r["hits"]) == 360 and r["accuracy"] == pytest.approx(r["hits"].count("1") / 360)
    assert "roma − router" in printed and "| tiny | 24 |" in printed
    # the JSON alone makes the same summary again
    assert roma_curve.main(["--summarize", str(out), "--bootstrap", "200"]) == 0
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")] == table
    assert roma_curve.main(["--out", str(out), *args]) == 2  # never over an existing file
