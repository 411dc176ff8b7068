"""Continual-learning metrics: golden values worked out by hand in the comments."""
import math

import pytest

from moram.metrics import (
    average_performance,
    backward_transfer,
    forward_transfer,
    reference_forgetting,
    summarize,
    validate_matrix,
    xtail_average,
    xtail_last,
    xtail_transfer,
)

# Rows: after training task 1, 2, 3; columns: score on task 1, 2, 3.
R3 = [
    [80.0, 10.0, 5.0],
    [60.0, 70.0, 20.0],
    [50.0, 65.0, 90.0],
]
B3 = [30.0, 5.0, 10.0]  # zero-shot scores of the initial model


def test_average_performance_is_mean_of_final_row():
    # (50 + 65 + 90) / 3 = 205 / 3
    assert average_performance(R3) == pytest.approx(205 / 3)


def test_backward_transfer_is_signed_and_divides_by_t_minus_1():
    # ((50 - 80) + (65 - 70)) / 2 = (-30 - 5) / 2 = -17.5
    assert backward_transfer(R3) == pytest.approx(-17.5)


def test_reference_forgetting_is_a_magnitude_over_t():
    # -(min(50-80, 0) + min(65-70, 0) + min(90-90, 0)) / 3 = (30 + 5 + 0) / 3 = 35 / 3
    assert reference_forgetting(R3) == pytest.approx(35 / 3)


def test_forward_transfer_uses_the_baseline_row():
    # ((R[1][2] - b2) + (R[2][3] - b3)) / 2 = ((10 - 5) + (20 - 10)) / 2 = 7.5
    assert forward_transfer(R3, B3) == pytest.approx(7.5)


def test_xtail_metrics():
    # Transfer: column 2 -> mean(10) = 10; column 3 -> mean(5, 20) = 12.5; mean = 11.25
    assert xtail_transfer(R3) == pytest.approx(11.25)
    # Average: (80+10+5 + 60+70+20 + 50+65+90) / 9 = 450 / 9 = 50
    assert xtail_average(R3) == pytest.approx(50.0)
    # Last: (50 + 65 + 90) / 3
    assert xtail_last(R3) == pytest.approx(205 / 3)


def test_summarize_names_each_variant():
    summary = summarize(R3, baseline=B3)
    assert summary == pytest.approx({
        "T": 3,
        "OP": 205 / 3,
        "BWT_signed": -17.5,
        "BWT_eq10": 17.5,   # (R11 - R31 + R22 - R32) / 2, forgetting-positive
        "reference_forgetting_magnitude": 35 / 3,
        "FWT": 7.5,
        "xtail_transfer": 11.25,
        "xtail_average": 50.0,
        "xtail_last": 205 / 3,
    })
    assert "FWT" not in summarize(R3)


def test_genuine_zero_scores_count():
    # Task 1 scores 0.0 right after training it, and task 2 scores 0.0 before it is trained.
    R = [
        [0.0, 0.0],
        [40.0, 50.0],
    ]
    # BWT = (40 - 0) / 1 = +40: positive backward transfer.
    assert backward_transfer(R) == pytest.approx(40.0)
    # Reference forgetting: -(min(40-0, 0) + min(50-50, 0)) / 2 = 0
    assert reference_forgetting(R) == 0.0
    # Transfer: column 2 -> mean(R[1][2]) = mean(0.0) = 0.0 (not "missing").
    assert xtail_transfer(R) == 0.0
    # Average: (0 + 0 + 40 + 50) / 4 = 22.5 (treating zeros as missing would give 45).
    assert xtail_average(R) == pytest.approx(22.5)
    assert xtail_last(R) == pytest.approx(45.0)


def test_forgetting_to_zero():
    R = [
        [70.0, 0.0],
        [0.0, 60.0],
    ]
    # BWT = (0 - 70) / 1 = -70
    assert backward_transfer(R) == pytest.approx(-70.0)
    # Reference forgetting: (70 + 0) / 2 = 35
    assert reference_forgetting(R) == pytest.approx(35.0)
    # OP: (0 + 60) / 2 = 30; Average: (70 + 0 + 0 + 60) / 4 = 32.5
    assert average_performance(R) == pytest.approx(30.0)
    assert xtail_average(R) == pytest.approx(32.5)
    # FWT with b = [10, 0]: (R[1][2] - b2) / 1 = (0 - 0) / 1 = 0
    assert forward_transfer(R, [10.0, 0.0]) == 0.0


def test_single_task():
    R = [[42.0]]
    # Nothing earlier to forget or transfer: BWT, FWT and Transfer are defined as 0.0.
    assert summarize(R, baseline=[10.0]) == {
        "T": 1,
        "OP": 42.0,
        "BWT_signed": 0.0,
        "BWT_eq10": 0.0,
        "reference_forgetting_magnitude": 0.0,
        "FWT": 0.0,
        "xtail_transfer": 0.0,
        "xtail_average": 42.0,
        "xtail_last": 42.0,
    }


def test_integer_and_numpy_inputs_are_accepted():
    np = pytest.importorskip("numpy")
    assert validate_matrix([[1, 2], [3, 4]]) == [[1.0, 2.0], [3.0, 4.0]]
    # (3 + 4) / 2 = 3.5
    assert average_performance(np.array([[1, 2], [3, 4]], dtype=np.float32)) == 3.5


@pytest.mark.parametrize(
    ("R", "message"),
    [
        ([], "at least one row"),
        ("abc", "list of rows"),
        (None, "list of rows"),
        ([[1.0, 2.0]], r"row 0: has 2 entries"),
        ([[1.0, 2.0], [3.0]], r"row 1: has 1 entries"),
        ([[1.0, 2.0], 3.0], r"row 1: expected a list"),
        ([[1.0, 2.0], [3.0, 101.0]], r"row 1, column 1: value 101.0 is outside \[0, 100\]"),
        ([[-0.5]], r"row 0, column 0: value -0.5 is outside"),
        ([[1.0, math.nan], [3.0, 4.0]], r"row 0, column 1: expected a finite number"),
        ([[math.inf]], r"row 0, column 0: expected a finite number"),
        ([["50"]], r"row 0, column 0: expected a number"),
        ([[True]], r"row 0, column 0: expected a number"),
    ],
)
def test_bad_matrices_are_rejected_with_row_and_column(R, message):
    with pytest.raises(ValueError, match=message):
        summarize(R)


def test_bad_baseline_is_rejected():
    with pytest.raises(ValueError, match=r"baseline: has 2 entries, expected one per task \(3\)"):
        forward_transfer(R3, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"baseline column 2: value 120.0 is outside"):
        summarize(R3, baseline=[1.0, 2.0, 120.0])
