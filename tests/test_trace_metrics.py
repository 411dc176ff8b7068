"""TRACE task metrics against hand computations and published examples."""
import pytest

from moram_platform.trace.data import TRACE_ORDER
from moram_platform.trace.task_metrics import (
    ANSWER_EXTRACTORS,
    TASK_METRIC,
    accuracy,
    answer_extractor,
    edit_similarity,
    restore_py150_literals,
    rouge_l,
    sari,
    score_task,
    tokenize_13a,
)


def test_task_metric_table_matches_trace():
    assert {task: TASK_METRIC[task] for task in TRACE_ORDER} == {
        "C-STANCE": "accuracy", "FOMC": "accuracy", "MeetingBank": "rouge_l", "Py150": "edit_similarity",
        "ScienceQA": "accuracy", "NumGLUE-cm": "accuracy", "NumGLUE-ds": "accuracy", "20Minuten": "sari",
    }


# -- SARI ----------------------------------------------------------------------------------------
# Published examples: the HF `evaluate` SARI metric card (metrics/sari/README.md) and the
# docstring of metrics/sari/sari.py, which TRACE's caculate_sari calls.
SARI_SOURCE = "About 95 species are currently accepted ."
SARI_REFERENCES = ["About 95 species are currently known .", "About 95 species are now accepted .",
                   "95 species are now accepted ."]


def test_sari_published_partial_match():
    assert sari([SARI_SOURCE], ["About 95 you now get in ."], [SARI_REFERENCES]) == pytest.approx(26.953601953601954)


def test_sari_published_partial_match_untokenized():
    # The card's "How to use" form: punctuation attached; 13a tokenization splits it off.
    refs = [r.replace(" .", ".") for r in SARI_REFERENCES]
    assert sari([SARI_SOURCE.replace(" .", ".")], ["About 95 you now get in."], [refs]) == pytest.approx(
        26.953601953601954)


def test_sari_published_perfect_match():
    assert sari([SARI_SOURCE], [SARI_SOURCE], [[SARI_SOURCE]]) == pytest.approx(100.0)


def test_sari_by_hand():
    # source "a b c", prediction "a d", one reference "a c e"; 0/0 counts as 1.
    # n=1: keep: kept {a}, all kept-in-ref {a, c}: P = 1, R = 1/2, F1 = 2/3
    #      delete: deleted {b, c}, good (not in ref) {b}: P = 1/2
    #      add: added {d}, none in ref; ref-only {e}: P = 0, R = 0, F1 = 0
    # n=2: keep: nothing kept, nothing to keep: F1 = 1
    #      delete: {"a b", "b c"} both good: P = 1;  add: {"a d"} not in ref: F1 = 0
    # n=3: keep 1; delete {"a b c"} good: 1; add: nothing added (P = 1), {"a c e"} missed (R = 0): F1 = 0
    # n=4: everything empty: keep 1, delete 1, add 1
    # keep = (2/3 + 1 + 1 + 1) / 4 = 11/12; delete = (1/2 + 1 + 1 + 1) / 4 = 7/8; add = 1/4
    # SARI = (11/12 + 7/8 + 1/4) / 3 = (22 + 21 + 6) / 72 = 49/72
    assert sari(["a b c"], ["a d"], ["a c e"]) == pytest.approx(100 * 49 / 72)


def test_sari_is_a_mean_over_examples_and_lowercases():
    # Example 1 is 49/72 as above (upper case changes nothing); example 2 is a perfect match (1).
    score = sari(["A B C", "x y"], ["a D", "x y"], [["a c e"], ["x y"]])
    assert score == pytest.approx(100 * (49 / 72 + 1) / 2)


def test_13a_tokenization():
    # sacreBLEU 13a: symbols split off; period/comma split unless between digits.
    assert tokenize_13a("Er kam (um 3.5 Uhr), sagte: \"Hallo\".") == 'Er kam ( um 3.5 Uhr ) , sagte : " Hallo " .'
    assert tokenize_13a("1,000 and 5-6 &amp; more") == "1,000 and 5 - 6 & more"


# -- ROUGE-L -------------------------------------------------------------------------------------
def test_rouge_l_lin_2004_example():
    # Lin (2004), ROUGE paper, section 3.1: reference S1 "police killed the gunman";
    # S2 "police kill the gunman" has LCS 3 of 4 words: 0.75; S3 "the gunman kill police": 2/4 = 0.5.
    reference = "police killed the gunman"
    assert rouge_l(["police kill the gunman"], [reference]) == pytest.approx(75.0)
    assert rouge_l(["the gunman kill police"], [reference]) == pytest.approx(50.0)
    assert rouge_l(["police kill the gunman", "the gunman kill police"], [reference] * 2) == pytest.approx(62.5)


def test_rouge_l_unequal_lengths_and_empty_prediction():
    # "the cat sat" vs "the cat sat on the mat": LCS 3, P = 3/3, R = 3/6, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    # an empty prediction scores 0 and still counts: (2/3 + 0) / 2 = 1/3
    refs = ["the cat sat on the mat", "anything"]
    assert rouge_l(["the cat sat", ""], refs) == pytest.approx(100 / 3)


# -- edit similarity (Py150) -------------------------------------------------------------------------
def test_edit_similarity_by_hand_and_fuzzywuzzy_readme():
    # "abcd" vs "abed": indel distance 2 (drop c, add e) over 8 chars: 100 * (1 - 2/8) = 75
    assert edit_similarity(["abed"], ["abcd"]) == pytest.approx(75.0)
    # fuzzywuzzy README: fuzz.ratio("this is a test", "this is a test!") -> 97, rounded from
    # 100 * (1 - 1/29) = 96.55... (one insertion over 14 + 15 chars); rapidfuzz does not round.
    score = edit_similarity(["this is a test"], ["this is a test!"])
    assert score == pytest.approx(100 * 28 / 29)
    assert round(score) == 97
    # Empty predictions score 0 and count: (75 + 0) / 2
    assert edit_similarity(["abed", ""], ["abcd", "x"]) == pytest.approx(37.5)


def test_py150_literals_are_restored_before_comparison():
    gold = "url ( r'<STR_LIT>' , code = <NUM_LIT:200> , sep = '<STR_LIT:/>' , n = <NUM_LIT> )"
    assert restore_py150_literals(gold) == "url ( r'' , code = 200 , sep = '/' , n = 0 )"
    assert score_task("Py150", ["return 200"], ["return <NUM_LIT:200>"]) == pytest.approx(100.0)


# -- accuracy and answer extraction ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "text", "expected"),
    [
        ("exact", "  B \n", "B"),
        ("first_char", "B\nA clause is a group of words.", "B"),
        ("first_line", "World.\nmore text", "world"),
        ("choice_letter", "B", "B"),
        ("choice_letter", "(C) because ...", "C"),
        ("choice_letter", "A.支持", "A"),
        ("choice_letter", "The answer is D.", "D"),
        ("choice_letter", "A clause is a group of words", ""),  # an article, not a choice
        ("fomc_choice", "hawkish", "B"),
        ("fomc_choice", "The stance is neutral, not dovish", "C"),
        ("cstance_choice", "反对", "B"),
        ("number", "6", "6"),
        ("number", "The answer is 6.0 moles", "6"),
        ("number", "1,000", "1000"),
        ("number", "1.4300000000000002", "1.43"),
        ("number", "August", "august"),  # NumGLUE-cm also has non-numeric answers
    ],
)
def test_answer_extractors(strategy, text, expected):
    assert ANSWER_EXTRACTORS[strategy](text) == expected


def test_exact_and_lenient_modes_on_real_answer_formats():
    # ScienceQA references are "<letter>\n<reasoning>"; both modes read the letter.
    science_gold = "B\nA clause is a group of words that contains both a subject and a predicate."
    assert score_task("ScienceQA", ["B"], [science_gold], extraction="exact") == 100.0
    assert score_task("ScienceQA", ["Answer: B"], [science_gold], extraction="lenient") == 100.0
    assert score_task("ScienceQA", ["Answer: B"], [science_gold], extraction="exact") == 0.0
    # FOMC / NumGLUE: chatty outputs count only under the lenient mode.
    assert score_task("FOMC", ["A. dovish"], ["A"], extraction="exact") == 0.0
    assert score_task("FOMC", ["A. dovish"], ["A"], extraction="lenient") == 100.0
    assert score_task("NumGLUE-ds", ["The answer is 2.0"], ["2"], extraction="lenient") == 100.0
    assert answer_extractor("agnews", "lenient") == "first_line"
    assert answer_extractor("C-STANCE", "exact") == "exact"


def test_accuracy_counts_empty_predictions_as_wrong():
    # hits: "A" == "A", "B" == "B"; "" never matches; "C" != "A": 2 of 4 = 50%
    assert accuracy(["A", "B", "", "C"], ["A", "B", "", "A"]) == 50.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: score_task("Lima", ["x"], ["y"]), "no metric for task 'Lima'"),
        (lambda: score_task("20Minuten", ["x"], ["y"]), "SARI needs the sources"),
        (lambda: score_task("FOMC", ["x"], ["y"], extraction="fuzzy"), "unknown mode 'fuzzy'"),
        (lambda: accuracy(["x"], ["y"], extract="nope"), "unknown strategy 'nope'"),
        (lambda: rouge_l(["a", "b"], ["a"]), r"predictions \(2\), references \(1\) differ in length"),
        (lambda: sari(["s"], ["a", "b"], ["a", "b"]), r"sources \(1\) differ in length"),
        (lambda: edit_similarity([], []), "nothing to score"),
    ],
)
def test_metric_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
