"""Metrics: agreement with scikit-learn and brute force, hand-computed Dice, errors."""
import math

import numpy as np
import pytest
from helpers import numpy_rng
from sklearn.metrics import average_precision_score, roc_auc_score

from ifad_fast.errors import IfadError
from ifad_fast.metrics import curve_metrics, dice, evaluate, format_table


@pytest.fixture
def rng():
    return numpy_rng()          # helpers.base_seed(): IFAD_TEST_SEED, named in every failure report


def _random_case(rng, n, p_pos=0.1, decimals=None, dtype=np.float64):
    y = rng.random(n) < p_pos
    s = rng.random(n) + 0.4 * y * rng.random(n)
    if decimals is not None:
        s = np.round(s, decimals)
    return s.astype(dtype), y


# ---------------------------------------------------------------- brute force references


def _brute_dice_best(s, y):
    best, best_t = -1.0, None
    for t in np.unique(s)[::-1]:  # descending: the first maximum is the highest threshold
        pred = s >= t
        tp = np.count_nonzero(pred & y)
        d = 2 * tp / (np.count_nonzero(pred) + np.count_nonzero(y))
        if d > best:
            best, best_t = d, t
    return best, best_t


def _brute_fpr95(s, y):
    n_pos, n_neg = np.count_nonzero(y), np.count_nonzero(~y)
    for t in np.unique(s)[::-1]:  # highest threshold whose recall >= 0.95
        pred = s >= t
        if np.count_nonzero(pred & y) / n_pos >= 0.95:
            return np.count_nonzero(pred & ~y) / n_neg
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- scikit-learn agreement


@pytest.mark.parametrize("decimals", [None, 2, 1, 0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ap_auroc_match_sklearn(rng, decimals, dtype):
    for _ in range(3):
        n = int(rng.integers(50, 20000))
        s, y = _random_case(rng, n, p_pos=rng.uniform(0.01, 0.5), decimals=decimals, dtype=dtype)
        if y.sum() == 0 or y.sum() == n:
            continue
        r = curve_metrics(s, y)
        assert r["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
        assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
        # Integer 0/1 labels give the same numbers as bool ones.
        r2 = curve_metrics(s, y.astype(np.uint8))
        assert r2["ap"] == r["ap"] and r2["auroc"] == r["auroc"]


def test_all_tied_scores_match_sklearn(rng):
    y = rng.random(500) < 0.3
    s = np.full(500, 0.5, dtype=np.float32)
    r = curve_metrics(s, y)
    assert r["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert r["auroc"] == pytest.approx(0.5, abs=1e-12)
    assert r["fpr95"] == 1.0


def test_perfect_and_inverted_scores():
    y = np.array([0, 0, 0, 1, 1], bool)
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    r = curve_metrics(s, y)
    assert (r["ap"], r["auroc"], r["fpr95"], r["dice_best"]) == (1.0, 1.0, 0.0, 1.0)
    assert r["threshold"] == 0.8
    r = curve_metrics(-s, y)
    assert r["auroc"] == 0.0
    assert r["fpr95"] == 1.0


# ---------------------------------------------------------------- brute force agreement


@pytest.mark.parametrize("decimals", [None, 1])
def test_dice_best_and_fpr95_match_brute_force(rng, decimals):
    for _ in range(20):
        n = int(rng.integers(5, 400))
        s, y = _random_case(rng, n, p_pos=rng.uniform(0.05, 0.6), decimals=decimals)
        if y.sum() == 0 or y.sum() == n:
            continue
        r = curve_metrics(s, y)
        best, best_t = _brute_dice_best(s, y)
        assert r["dice_best"] == pytest.approx(best, abs=1e-12)
        assert r["threshold"] == best_t
        assert r["fpr95"] == pytest.approx(_brute_fpr95(s, y), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_small_blocks_give_the_same_numbers(rng, decimals):
    # The positives are processed in blocks aligned to tie runs; tiny blocks (smaller
    # than a tie run) must give exactly what one block gives.
    from ifad_fast.metrics import _curve_from_sorted

    s, y = _random_case(rng, 3000, p_pos=0.3, decimals=decimals)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    whole = _curve_from_sorted(pos, neg, block=10**9)
    for block in (1, 2, 3, 7, 64):
        part = _curve_from_sorted(pos, neg, block=block)
        for key in ("dice_best", "threshold", "fpr95", "fpr95_threshold", "auroc"):
            assert part[key] == whole[key], (block, key)
        assert part["ap"] == pytest.approx(whole["ap"], abs=1e-12)
    assert whole["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)


def test_fpr95_hand_made():
    # 20 positives with scores 1..20, negatives at 0.5, 1.5 and 2.5.  Recall >= 0.95 needs
    # 19 positives: highest such threshold is 2 -> negatives >= 2: {2.5} -> FPR 1/3.
    s = np.concatenate([np.arange(1, 21, dtype=float), [0.5, 1.5, 2.5]])
    y = np.array([True] * 20 + [False] * 3)
    r = curve_metrics(s, y)
    assert r["fpr95"] == pytest.approx(1 / 3)
    assert r["fpr95_threshold"] == 2.0


# ---------------------------------------------------------------- Dice by hand


def test_dice_hand_made_2x2x2():
    truth = np.zeros((2, 2, 2), bool)
    truth[0, 0, 0] = truth[0, 0, 1] = truth[0, 1, 0] = True       # 3 voxels
    pred = np.zeros((2, 2, 2), bool)
    pred[0, 0, 0] = pred[0, 0, 1] = pred[1, 1, 1] = pred[1, 0, 0] = True  # 4 voxels, 2 hit
    assert dice(pred, truth) == pytest.approx(4 / 7)      # 2*2 / (4+3)
    assert dice(truth, truth) == 1.0
    assert dice(np.zeros_like(truth), truth) == 0.0
    assert dice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0  # both empty
    assert dice(pred, np.zeros_like(truth)) == 0.0
    assert dice(pred.astype(np.uint8), truth.astype(np.float32) * 4) == pytest.approx(4 / 7)


def test_evaluate_per_case_hand_made():
    # Case A (2x2x2): lesion = 2 voxels; scores >= 0.5 hit 1 lesion voxel + 1 normal voxel.
    sa = np.zeros((2, 2, 2), np.float32)
    ma = np.zeros((2, 2, 2), np.uint8)
    ma[0, 0, 0] = ma[0, 0, 1] = 1
    sa[0, 0, 0] = 0.9      # TP
    sa[0, 0, 1] = 0.2      # FN
    sa[1, 1, 1] = 0.6      # FP
    # Case B (2x2x2): lesion = 1 voxel, detected, nothing else -> Dice 1.
    sb = np.zeros((2, 2, 2), np.float32)
    mb = np.zeros((2, 2, 2), bool)
    mb[1, 0, 1] = True
    sb[1, 0, 1] = 0.7
    # Validation set whose best-Dice threshold is 0.5 (the lesion scores 0.5, normals 0.4).
    sv = np.full((2, 2, 2), 0.4, np.float32)
    mv = np.zeros((2, 2, 2), bool)
    mv[0, 1, 1] = True
    sv[0, 1, 1] = 0.5
    r = evaluate([sa, sb], [ma, mb], val_scores=[sv], val_masks=[mv], names=["A", "B"])
    assert r["threshold_source"] == "validation"
    assert r["threshold"] == 0.5
    # Case A: TP 1, FP 1, FN 1 -> 2/(2+1+1) = 0.5.  Case B: 1.0.
    assert [c["name"] for c in r["per_case"]] == ["A", "B"]
    assert r["per_case"][0]["dice"] == pytest.approx(0.5)
    assert r["per_case"][1]["dice"] == pytest.approx(1.0)
    assert r["dice_mean"] == pytest.approx(0.75)
    assert r["dice_std"] == pytest.approx(0.25)            # population std of {0.5, 1.0}
    assert r["n_cases"] == 2
    # Pooled test (16 voxels): positives {0.9, 0.2, 0.7}, one normal voxel at 0.6, the
    # other 13 at 0.  Threshold 0.9: 2/(1+3) = 0.5; 0.7: 4/(2+3) = 0.8; 0.6: 4/(3+3);
    # 0.2: TP 3, FP 1 -> 6/(4+3) = 6/7 (best); 0: 6/(16+3).
    assert r["dice_best"] == pytest.approx(6 / 7)
    assert r["dice_best_threshold"] == pytest.approx(0.2)


def test_case_without_lesion_is_a_healthy_case():
    """A mask with no lesion voxel makes a healthy case: out of the per-case Dice and the pooled
    curves, counted by its voxels (and components) at or above the threshold."""
    s1 = np.array([[[0.1, 0.9]]], np.float32)
    m1 = np.array([[[0, 1]]], bool)
    s2 = np.array([[[0.95, 0.2]]], np.float32)     # no lesion, one voxel above 0.9
    m2 = np.zeros((1, 1, 2), bool)
    r = evaluate([s1, s2], [m1, m2], names=["lesion", "healthy"])
    assert r["threshold"] == pytest.approx(0.9)
    assert [(c["name"], c["dice"]) for c in r["per_case"]] == [("lesion", 1.0)]
    assert r["per_healthy"] == [{"name": "healthy", "fp_voxels": 1, "fp_lesions": 1}]
    assert r["n_cases"] == 1 and r["n_healthy"] == 1 and r["n_voxels"] == 2
    assert r["ap"] == 1.0 and r["auroc"] == 1.0 and r["dice_best"] == 1.0       # 0.95 is not pooled
    assert r["fp_voxels_per_healthy"] == 1.0 and r["fp_lesions_per_healthy"] == 1.0
    none = evaluate([s1], [m1])
    assert none["fp_voxels_per_healthy"] is None and none["fp_lesions_per_healthy"] is None and none["n_healthy"] == 0


def test_fp_voxels_per_healthy_at_the_validation_threshold():
    """Two healthy cases: 3 voxels at or above the validation threshold 0.5 in one (two touching
    diagonally: one component, and one apart), none in the other -> 1.5 voxels and 1.0 components
    per healthy case; the test set's own best threshold (lower) is not used."""
    lesion_s = np.full((4, 4, 4), 0.1, np.float32)
    lesion_m = np.zeros((4, 4, 4), bool)
    lesion_m[0, 0, 0] = True
    lesion_s[0, 0, 0] = 0.3                                  # the test set alone would pick 0.3
    h1 = np.full((4, 4, 4), 0.2, np.float32)
    h1[1, 1, 1] = h1[2, 2, 2] = 0.6
    h1[0, 3, 3] = 0.5
    h2 = np.full((4, 4, 4), 0.45, np.float32)
    healthy = np.zeros((4, 4, 4), bool)
    val_s = np.full((2, 2, 2), 0.2, np.float32)
    val_m = np.zeros((2, 2, 2), bool)
    val_s[0, 0, 0], val_m[0, 0, 0] = 0.5, True
    r = evaluate([lesion_s, h1, h2], [lesion_m, healthy, healthy], val_scores=[val_s], val_masks=[val_m])
    assert r["threshold"] == 0.5 and r["threshold_source"] == "validation"
    assert [c["fp_voxels"] for c in r["per_healthy"]] == [3, 0]
    assert r["fp_voxels_per_healthy"] == 1.5 and r["fp_lesions_per_healthy"] == 1.0
    assert r["dice_mean"] == 0.0                             # the lesion case's 0.3 is below 0.5


def _lesion_case():
    """A 10³ case, 5 mm voxels (0.125 mL each), scores 0.9 on the prediction and 0.1 elsewhere.

    Ground truth: L1 = (1,1,1) + (2,2,2), diagonal neighbours: one lesion (26-connectivity), 0.25 mL;
    L2 = the 2³ block at 6..7: 1 mL; L3 = (8,1,1): 0.125 mL. Prediction: (2,2,2) finds L1, (7,7,7)
    finds L2; (1,8,8) alone and (4,4,4) + (5,5,5) (diagonal neighbours, one component; (5,5,5)
    touches L2's corner but holds no lesion voxel) are two false positives of 0.125 and 0.25 mL.
    L3 is missed."""
    truth = np.zeros((10, 10, 10), bool)
    truth[1, 1, 1] = truth[2, 2, 2] = truth[8, 1, 1] = True
    truth[6:8, 6:8, 6:8] = True
    score = np.full(truth.shape, 0.1, np.float32)
    for idx in ((2, 2, 2), (7, 7, 7), (1, 8, 8), (4, 4, 4), (5, 5, 5)):
        score[idx] = 0.9
    return score, truth


def test_lesion_detection_by_hand():
    from ifad_fast.metrics import lesion_detection

    score, truth = _lesion_case()
    got = lesion_detection(score >= 0.9, truth, voxel_volume=125.0)
    assert sorted(got["found"]) == [0.25, 1.0] and got["missed"] == [0.125]
    assert sorted(got["false"]) == [0.125, 0.25]
    in_voxels = lesion_detection(score >= 0.9, truth)
    assert sorted(in_voxels["found"]) == [2, 8] and in_voxels["missed"] == [1] and sorted(in_voxels["false"]) == [1, 2]
    nothing = lesion_detection(np.zeros_like(truth), truth)
    assert len(nothing["missed"]) == 3 and nothing["found"] == nothing["false"] == []
    with pytest.raises(IfadError, match="shape"):
        lesion_detection(truth[:2], truth)


def test_lesion_wise_metrics_in_evaluate_by_hand():
    """Found 2 of 3 lesions, 2 false positive components: precision 2/4, recall 2/3, F1 4/7; by
    size (mL): < 1 holds L1 (found), L3 (missed) and both false positives -> 1/3, 1/2, 2/5;
    1-10 holds L2 -> 1, 1, 1; >= 10 is empty -> None. Without voxel volumes every size is < 1000
    voxels. The threshold 0.9 comes from the validation case."""
    score, truth = _lesion_case()
    val_s = np.array([[[0.9, 0.1]]], np.float32)
    val_m = np.array([[[1, 0]]], bool)
    r = evaluate([score], [truth], val_scores=[val_s], val_masks=[val_m], voxel_volumes=[125.0])
    assert r["threshold"] == pytest.approx(0.9)
    assert r["lesion_counts"] == {"lesions": 3, "found": 2, "missed": 1, "false_positive": 2}
    assert r["lesion_precision"] == 0.5 and r["lesion_recall"] == pytest.approx(2 / 3)
    assert r["lesion_f1"] == pytest.approx(4 / 7)
    small, mid, big = (r["lesion_by_size"][k] for k in ("< 1 mL", "1-10 mL", ">= 10 mL"))
    assert (small["found"], small["missed"], small["false_positive"]) == (1, 1, 2)
    assert small["precision"] == pytest.approx(1 / 3) and small["recall"] == 0.5 and small["f1"] == pytest.approx(0.4)
    assert (mid["precision"], mid["recall"], mid["f1"]) == (1.0, 1.0, 1.0)
    assert big["lesions"] == big["false_positive"] == 0 and big["precision"] is big["recall"] is big["f1"] is None
    assert r["lesion_size_unit"] == "mL"
    case = r["per_case"][0]
    assert (case["lesions"], case["found"], case["false_positive"]) == (3, 2, 2)
    voxels = evaluate([score], [truth], val_scores=[val_s], val_masks=[val_m])
    assert voxels["lesion_size_unit"] == "voxels" and voxels["lesion_by_size"]["< 1000 voxels"]["lesions"] == 3


def test_lesion_wise_counts_stay_inside_the_region():
    """A region leaves out a predicted component outside it (no false positive) and the part of a
    lesion outside it (a lesion only outside is no lesion)."""
    score, truth = _lesion_case()
    region = np.ones(truth.shape, bool)
    region[:, 8:, 8:] = False                                  # hides the false positive at (1, 8, 8)
    region[8, 1, 1] = False                                    # and the missed lesion L3
    r = evaluate([score], [truth], regions=[region], val_scores=[score], val_masks=[truth])
    assert r["lesion_counts"] == {"lesions": 2, "found": 2, "missed": 0, "false_positive": 1}


def test_ap_per_volume_is_the_mean_of_sklearn_per_case(rng):
    """ap_per_volume: the mean over lesion cases of scikit-learn's AP of each case; a healthy case
    takes no part in it, nor in the pooled AP."""
    scores, masks = _volumes(rng, 4, decimals=2)
    healthy = rng.random(masks[0].shape).astype(np.float32)
    r = evaluate([*scores, healthy], [*masks, np.zeros_like(masks[0])])
    per = [average_precision_score(m.ravel(), s.ravel()) for s, m in zip(scores, masks)]
    assert [c["ap"] for c in r["per_case"]] == pytest.approx(per, abs=1e-9)
    assert r["ap_per_volume"] == pytest.approx(np.mean(per), abs=1e-9)
    pooled = average_precision_score(np.concatenate([m.ravel() for m in masks]),
                                     np.concatenate([s.ravel() for s in scores]))
    assert r["ap"] == pytest.approx(pooled, abs=1e-6) and r["ap"] != pytest.approx(r["ap_per_volume"], abs=1e-4)


# ---------------------------------------------------------------- evaluate()


def _volumes(rng, n_cases, shape=(12, 10, 8), decimals=None):
    scores, masks = [], []
    for _ in range(n_cases):
        m = np.zeros(shape, bool)
        c = rng.integers(2, np.array(shape) - 2)
        m[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 1:c[2] + 2] = True
        s = rng.random(shape) + 0.6 * m * rng.random(shape)
        if decimals is not None:
            s = np.round(s, decimals)
        scores.append(s.astype(np.float32))
        masks.append(m)
    return scores, masks


@pytest.mark.parametrize("decimals", [None, 1])
def test_evaluate_pools_like_sklearn(rng, decimals):
    scores, masks = _volumes(rng, 5, decimals=decimals)
    r = evaluate(scores, masks)
    s = np.concatenate([x.ravel() for x in scores])
    y = np.concatenate([x.ravel() for x in masks])
    assert r["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    best, best_t = _brute_dice_best(s, y)
    assert r["dice_best"] == pytest.approx(best, abs=1e-12)
    assert r["fpr95"] == pytest.approx(_brute_fpr95(s, y), abs=1e-12)
    assert r["threshold_source"] == "test (no validation set given)"
    assert r["threshold"] == r["dice_best_threshold"] == best_t
    per = [dice(x >= np.float32(best_t), m) for x, m in zip(scores, masks)]
    assert [c["dice"] for c in r["per_case"]] == per
    assert r["dice_mean"] == pytest.approx(np.mean(per))
    assert r["dice_std"] == pytest.approx(np.std(per))
    assert [c["name"] for c in r["per_case"]] == [f"case_{i:03d}" for i in range(5)]
    assert r["n_cases"] == 5 and r["n_voxels"] == y.size and r["n_positive"] == y.sum()


def test_evaluate_with_validation_uses_validation_threshold(rng):
    scores, masks = _volumes(rng, 4)
    vs, vm = _volumes(rng, 3)
    # Shift the validation scores so its best threshold differs from the test's.
    vs = [v + np.float32(0.25) for v in vs]
    r = evaluate(scores, masks, val_scores=vs, val_masks=vm)
    rv = curve_metrics(np.concatenate([v.ravel() for v in vs]),
                       np.concatenate([m.ravel() for m in vm]))
    rt = evaluate(scores, masks)
    assert r["threshold_source"] == "validation"
    assert r["threshold"] == rv["threshold"]
    assert r["threshold"] != rt["threshold"]
    # The pooled test metrics do not depend on the validation set.
    for k in ("dice_best", "ap", "auroc", "fpr95"):
        assert r[k] == rt[k]
    per = [dice(x >= np.float32(rv["threshold"]), m) for x, m in zip(scores, masks)]
    assert [c["dice"] for c in r["per_case"]] == per


def test_evaluate_regions_restrict_voxels(rng):
    scores, masks = _volumes(rng, 3)
    regions = [rng.random(m.shape) < 0.7 for m in masks]
    for m, reg in zip(masks, regions):
        reg |= m
    r = evaluate(scores, masks, regions=regions)
    s = np.concatenate([x[g] for x, g in zip(scores, regions)])
    y = np.concatenate([m[g] for m, g in zip(masks, regions)])
    assert r["n_voxels"] == y.size
    assert r["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)


def test_evaluate_does_not_modify_inputs(rng):
    scores, masks = _volumes(rng, 3)
    before = [(s.copy(), m.copy()) for s, m in zip(scores, masks)]
    evaluate(scores, masks, val_scores=scores, val_masks=masks)
    for (s0, m0), s, m in zip(before, scores, masks):
        assert np.array_equal(s0, s) and np.array_equal(m0, m)


# ---------------------------------------------------------------- errors


def test_errors_raise_ifad_error():
    s = numpy_rng().random((3, 3, 3)).astype(np.float32)
    m = np.zeros((3, 3, 3), bool)
    m[1, 1, 1] = True
    with pytest.raises(IfadError, match="no test cases"):
        evaluate([], [])
    with pytest.raises(IfadError, match="shape"):
        evaluate([s], [m[:2]])
    with pytest.raises(IfadError, match="no anomalous"):
        evaluate([s], [np.zeros_like(m)])
    bad = s.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(IfadError, match="NaN"):
        evaluate([bad], [m])
    with pytest.raises(IfadError, match="NaN"):
        evaluate([s], [m], val_scores=[bad], val_masks=[m])
    with pytest.raises(IfadError, match="one mask per case"):
        evaluate([s, s], [m])
    with pytest.raises(IfadError, match="both or neither"):
        evaluate([s], [m], val_scores=[s])
    with pytest.raises(IfadError, match="one name per case"):
        evaluate([s], [m], names=["a", "b"])
    with pytest.raises(IfadError, match="one voxel volume per case"):
        evaluate([s], [m], voxel_volumes=[1.0, 1.0])
    with pytest.raises(IfadError):
        curve_metrics(np.array([]), np.array([], bool))
    with pytest.raises(IfadError, match="shape"):
        curve_metrics(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(IfadError, match="no anomalous"):
        curve_metrics(np.zeros(3), np.zeros(3, bool))
    with pytest.raises(IfadError, match="NaN"):
        curve_metrics(np.array([0.1, np.nan]), np.array([True, False]))
    with pytest.raises(IfadError, match="normal voxels"):
        curve_metrics(np.zeros(3), np.ones(3, bool))
    with pytest.raises(IfadError, match="shape"):
        dice(np.zeros(3, bool), np.zeros(4, bool))
    # Messages are one line.
    try:
        evaluate([s], [m[:2]])
    except IfadError as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------- table


def test_format_table():
    res = {"dice_best": 0.681, "dice_mean": 0.640, "dice_std": 0.177, "ap": 0.733,
           "auroc": 0.992, "fpr95": 0.0462}
    t = format_table(res)
    lines = t.splitlines()
    assert len(lines) == 3
    for col in ("Method", "[DICE]", "DICE (μ ± σ)", "AP", "AUROC", "FPR@95R"):
        assert col in lines[0]
    assert "IT (s)" not in lines[0]
    assert lines[2].startswith("IF 3D (ifad-fast)")
    for cell in ("0.681", "0.640 ± 0.177", "0.733", "0.992", "0.0462"):
        assert cell in lines[2]
    t2 = format_table(dict(res, seconds_per_case=51.14), method="mine")
    assert "IT (s)" in t2.splitlines()[0]
    assert t2.splitlines()[2].startswith("mine") and t2.splitlines()[2].endswith("51.1")
    assert not math.isnan(len(t2))


def test_format_table_with_the_metrics_beyond_the_paper(rng):
    """evaluate's result: the paper's table, a blank line, then AP per volume, lesion precision,
    recall, F1 and FP voxels per healthy case ('-' when there is no healthy case)."""
    scores, masks = _volumes(rng, 2)
    r = evaluate(scores, masks)
    lines = format_table(r, method="m").splitlines()
    assert len(lines) == 7 and lines[3] == ""
    for col in ("AP per volume", "lesion precision", "lesion recall", "lesion F1", "FP voxels / healthy (0)"):
        assert col in lines[4]
    cells = lines[6].split()
    assert cells[0] == "m" and cells[1:5] == [f"{r[k]:.3f}" for k in ("ap_per_volume", "lesion_precision",
                                                                     "lesion_recall", "lesion_f1")]
    assert cells[5] == "-"
    healthy = evaluate([*scores, scores[0] + 1], [*masks, np.zeros_like(masks[0])])
    assert format_table(healthy).splitlines()[6].split()[-1] == f"{healthy['fp_voxels_per_healthy']:.1f}"


def test_restoration_fit_by_hand():
    """4 brain voxels of 8: restored − observed = 0, 1, −1, 3 -> within one 3/4, exact 1/4; the mean
    cross-entropy is over the brain voxels only."""
    from ifad_fast.metrics import restoration_fit

    brain = np.zeros((2, 2, 2), bool)
    brain[0, 0, :] = brain[1, 1, :] = True
    observed = np.full((2, 2, 2), 5, np.uint8)
    restored = observed.copy()
    restored[0, 0, 1], restored[1, 1, 0], restored[1, 1, 1] = 6, 4, 8
    restored[1, 0, 0] = 0                                                 # outside the brain: ignored
    score = np.where(brain, 2.0, 100.0).astype(np.float32)
    score[0, 0, 0] = 1.0
    fit = restoration_fit(restored, observed, brain, score)
    assert fit == {"within_one": 0.75, "exact": 0.25, "mean_ce": pytest.approx(1.75)}
    with pytest.raises(IfadError):
        restoration_fit(restored, observed, np.zeros_like(brain), score)


def test_pr_curve_points_lie_on_sklearns_curve(rng):
    """evaluate's pr_curve: points of scikit-learn's precision-recall curve (one per distinct lesion
    score when there are fewer lesion voxels than PR_POINTS), recall ascending up to 1; with many
    lesion voxels, about PR_POINTS of them."""
    from sklearn.metrics import precision_recall_curve

    from ifad_fast.metrics import PR_POINTS

    scores, masks = _volumes(rng, 1, shape=(6, 6, 5), decimals=2)
    r = evaluate(scores, masks)["pr_curve"]
    p_ref, r_ref, _ = precision_recall_curve(masks[0].ravel(), scores[0].ravel())
    reference = set(zip(np.round(r_ref, 12), np.round(p_ref, 12)))
    assert len(r["recall"]) == len(np.unique(scores[0][masks[0]])) < PR_POINTS
    assert all((round(a, 12), round(b, 12)) in reference for a, b in zip(r["recall"], r["precision"]))
    assert r["recall"] == sorted(r["recall"]) and r["recall"][-1] == 1.0
    big_mask = rng.random((20, 20, 50)) < 0.3                # 6000 lesion voxels, as many distinct scores
    many = evaluate([(rng.random(big_mask.shape) + big_mask).astype(np.float32)], [big_mask])["pr_curve"]
    assert PR_POINTS <= len(many["recall"]) <= 2 * PR_POINTS + 2 and many["recall"][-1] == 1.0
