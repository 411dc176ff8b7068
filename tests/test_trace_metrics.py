"""TRACE task metrics against hand computations, published examples and the official codes' rules.

Every golden value below is worked out by hand from the rule of the official file named next to
it: "MoRAM" = Artificer-AI-Lab/MoRAM TRACE/ (infer_multi_command.py, metrics.py,
evaluations/*.py, evaluations/qwen_math_parser.py), "TRACE" = BeyonderXX/TRACE (metrics.py,
evaluations/*.py). Line numbers refer to those files.
"""
import pytest

from moram_platform.trace.data import STANDARD_CL_TASKS, TRACE_ORDER
from moram_platform.trace.math_answers import (
    extract_math_answer,
    find_boxed,
    math_equal,
    normalize_math_answer,
    parse_number,
)
from moram_platform.trace.task_metrics import (
    ANSWER_EXTRACTORS,
    MORAM_REPO_CHOICE_LABELS,
    SCORINGS,
    TASK_METRIC,
    accuracy,
    edit_similarity,
    exact_accuracy,
    lenient_extractor,
    moram_repo_choice,
    prefix_accuracy,
    restore_py150_literals,
    rouge_l,
    sari,
    science_qa_answer,
    score_task,
    tokenize_13a,
)


def test_task_metric_table_matches_both_codes():
    # MoRAM collect_results.py task_metric (l. 16-42); TRACE's README table for the 8 TRACE tasks.
    assert {task: TASK_METRIC[task] for task in TRACE_ORDER} == {
        "C-STANCE": "accuracy", "FOMC": "accuracy", "MeetingBank": "rouge_l", "Py150": "edit_similarity",
        "ScienceQA": "accuracy", "NumGLUE-cm": "accuracy", "NumGLUE-ds": "accuracy", "20Minuten": "sari",
    }
    assert all(TASK_METRIC[task] == "accuracy" for task in STANDARD_CL_TASKS)
    assert SCORINGS == ("moram-repo", "trace", "lenient", "olora")


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


# -- ROUGE-L (rouge package: summary level, sentences split on ".", DISTINCT words, union LCS) ----
def test_rouge_l_lin_2004_example():
    # Lin (2004), section 3.1: reference "police killed the gunman"; "police kill the gunman"
    # shares police/the/gunman: P = R = 3/4, F = 0.75; "the gunman kill police": LCS 2, F = 0.5.
    reference = "police killed the gunman"
    assert rouge_l(["police kill the gunman"], [reference]) == pytest.approx(75.0)
    assert rouge_l(["the gunman kill police"], [reference]) == pytest.approx(50.0)
    assert rouge_l(["police kill the gunman", "the gunman kill police"], [reference] * 2) == pytest.approx(62.5)


def test_rouge_l_counts_distinct_words_and_splits_sentences_on_periods():
    # "the cat the cat" vs "the cat sat": n = |{the, cat}| = 2, m = 3, LCS words {the, cat}:
    # P = 1, R = 2/3, F = 2 * (2/3) / (5/3) = 0.8 (a token-level ROUGE-L would give P = 2/4).
    assert rouge_l(["the cat the cat"], ["the cat sat"]) == pytest.approx(80.0)
    # "a b. c d" vs "a c. b d": reference sentence "a c" gets {a} from "a b" and {c} from "c d",
    # "b d" adds {b, d}: union LCS 4 of 4 words each side: F = 1 (one whole-text LCS would be 3).
    assert rouge_l(["a b. c d"], ["a c. b d"]) == pytest.approx(100.0)


def test_rouge_l_moram_newline_quirk():
    # MoRAM metrics.py l. 55-56: a "\n" is appended to a hypothesis without one. "a b." + "\n"
    # splits into "a b" and "" -> words {a, b, ""}: n = 3, m = |{a, b, c}| = 3, LCS {a, b}:
    # P = R = 2/3, F = 2/3. Without it (TRACE l. 53-57, F symmetric): P = 1, R = 2/3, F = 0.8.
    assert score_task("MeetingBank", ["a b."], ["a b c"], scoring="moram-repo") == pytest.approx(200 / 3)
    assert score_task("MeetingBank", ["a b."], ["a b c"], scoring="trace") == pytest.approx(80.0)
    # Without a final "." the appended "\n" is only whitespace: the same 0.8 under all rules.
    for scoring in SCORINGS:
        assert score_task("MeetingBank", ["a b"], ["a b c"], scoring=scoring) == pytest.approx(80.0)


def test_rouge_l_empty_and_dot_only_predictions_score_zero_and_count():
    # MoRAM/TRACE caculate_rouge: "" is skipped but divides (l. 67-71 / 65-70): (1 + 0) / 2.
    assert rouge_l(["a b", ""], ["a b", "a b"]) == pytest.approx(50.0)
    # "..." has no sentence left (TRACE raises there); with MoRAM's "\n" it is one empty word: F 0.
    assert rouge_l(["..."], ["a b"]) == 0.0
    assert rouge_l(["..."], ["a b"], hypothesis_newline=True) == 0.0


# -- edit similarity (Py150): fuzzywuzzy fuzz.ratio, an int ------------------------------------------
def test_edit_similarity_is_fuzzywuzzys_rounded_ratio():
    # "abcd" vs "abed": indel distance 2 over 8 chars: 100 * (1 - 2/8) = 75
    assert edit_similarity(["abed"], ["abcd"]) == pytest.approx(75.0)
    # fuzzywuzzy README: fuzz.ratio("this is a test", "this is a test!") -> 97 (96.55 rounded).
    assert edit_similarity(["this is a test"], ["this is a test!"]) == 97.0
    assert edit_similarity(["this is a test"], ["this is a test!"], rounded=False) == pytest.approx(100 * 28 / 29)
    # fuzzywuzzy utils.intr = int(round(x)), Python's half-to-even: LCS 5 of 8 + 8 chars is
    # 62.5 -> 62; LCS 7 is 87.5 -> 88.
    assert edit_similarity(["abcdexyz"], ["abcdefgh"]) == 62.0
    assert edit_similarity(["abcdefgz"], ["abcdefgh"]) == 88.0
    # Empty predictions score 0 and count (MoRAM metrics.py l. 153-157): (75 + 0) / 2
    assert edit_similarity(["abed", ""], ["abcd", "x"]) == pytest.approx(37.5)


def test_py150_literals_are_restored_before_comparison():
    # MoRAM/TRACE eval_Py150.postprocess (l. 6-12)
    gold = "url ( r'<STR_LIT>' , code = <NUM_LIT:200> , sep = '<STR_LIT:/>' , n = <NUM_LIT> )"
    assert restore_py150_literals(gold) == "url ( r'' , code = 200 , sep = '/' , n = 0 )"
    assert score_task("Py150", ["return 200"], ["return <NUM_LIT:200>"]) == pytest.approx(100.0)
    # The lenient scoring keeps the unrounded ratio.
    assert score_task("Py150", ["this is a test"], ["this is a test!"], scoring="lenient") == pytest.approx(
        100 * 28 / 29)


# -- moram-repo: choice letters (MoRAM infer_multi_command.py postprocess_predictions, l. 216-233) ----
@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("FOMC", "B", "B"),
        ("FOMC", " (C) neutral", "C"),                  # l. 224: \b([ABC])\b on the stripped text
        ("FOMC", "The answer is B", "B"),
        ("FOMC", "a hawkish stance", "A"),              # l. 41: IGNORECASE, the article "a" is A
        ("FOMC", "Hawkish", "A"),                       # l. 228: first char that is a label: 'a'
        ("FOMC", "neutral", "A"),                       # l. 228: 'a' in neutral
        ("FOMC", "dovish", "dovish"),                   # l. 232: no label letter: text kept
        ("C-STANCE", "A.支持", "A"),
        ("C-STANCE", "支持A", "A"),                      # 持A: no word boundary; l. 228 finds 'A'
        ("C-STANCE", "反对", "反对"),
        ("BoolQA", "False", "A"),                       # word labels turned into letters (quirk)
        ("BoolQA", "True", "True"),
        ("amazon", "very negative", "A"),
        ("amazon", "very positive", "very positive"),
        ("dbpedia", "Album", "A"),
        ("yahoo", "Health", "H"),                       # l. 37: yahoo's labels run to J, 'H' is one
        ("yahoo", "Sports", "Sports"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.isascii() else None,
)
def test_moram_repo_choice_letters(task, text, expected):
    assert moram_repo_choice(text, MORAM_REPO_CHOICE_LABELS[task]) == expected


def test_moram_repo_choice_tasks_are_the_official_list():
    # l. 26-39: NumGLUE is excluded there (math); MNLI, RTE, ... are not listed (scored raw).
    assert {task: "".join(labels) for task, labels in MORAM_REPO_CHOICE_LABELS.items()} == {
        "C-STANCE": "ABC", "FOMC": "ABC", "BoolQA": "AB", "QQP": "AB", "amazon": "ABCD", "yelp": "ABCD",
        "agnews": "ABCD", "dbpedia": "ABCDEFGH", "yahoo": "ABCDEFGHIJ"}


# -- moram-repo: accuracy = the prediction STARTS WITH the gold (MoRAM metrics.py l. 78-89) --------
@pytest.mark.parametrize(
    ("prediction", "reference", "hit"),
    [
        ("Bad movie", "Bad", True),      # l. 82-83: prediction cut to len(target)
        ("  Good\n", "Good", True),      # l. 82: the prediction is stripped
        ("Ba", "Bad", False),            # shorter: compared whole, differs
        ("good", "Good", False),         # case counts
        ("", "A", False),                # l. 84: empty skipped, still divides
        ("entailment.", "entailment", True),
    ],
)
def test_prefix_accuracy(prediction, reference, hit):
    assert prefix_accuracy([prediction], [reference]) == (100.0 if hit else 0.0)


def test_moram_repo_accuracy_per_task_family():
    # FOMC: letters first (l. 311), then prefix match: "a hawkish stance"->A (gold A: hit),
    # "B" hit, "neutral"->A (gold C: miss), "dovish" stays (miss): 2 of 4.
    assert score_task("FOMC", ["a hawkish stance", "B", "neutral", "dovish"], ["A", "B", "C", "A"]) == 50.0
    # BoolQA (l. 374-375 eval_BoolQA): "True" survives, "False" -> "A" never equals "False": 1 of 2.
    assert score_task("BoolQA", ["True", "False"], ["True", "False"]) == 50.0
    # MNLI is not in the choice list: eval_QQP's prefix match on the raw text (l. 378-380).
    assert score_task("MNLI", ["neutral", "entailment because"], ["neutral", "entailment"]) == 100.0
    # COPA: letters by prefix: "B: Water flowed" starts with "B".
    assert score_task("COPA", ["B: Water flowed", "A"], ["B", "B"]) == 50.0


def test_moram_repo_science_qa_reads_the_first_character():
    # eval_ScienceQA.resolve (l. 6-22): strip, first char, "N/A" when empty; then prefix match.
    assert [science_qa_answer(t) for t in ["B\nBecause ...", " C", "", "Answer: B"]] == ["B", "C", "N/A", "A"]
    gold = "B\nA clause is a group of words that contains both a subject and a predicate."
    assert score_task("ScienceQA", ["B\nA clause ...", " B", "", "Answer: B"], [gold] * 4) == 50.0


# -- moram-repo: NumGLUE through the Qwen2.5-Math parser (MoRAM qwen_math_parser.py) ---------------
@pytest.mark.parametrize(
    ("prediction", "gold", "hit"),
    [
        ("\\boxed{12}", "12", True),                        # find_box l. 42-65
        ("so \\boxed{x=5} or \\boxed{7}", "7", True),       # the LAST boxed (l. 46)
        ("\\boxed{x=5}", "5", True),                        # strip_string l. 195-196: "x=" removed
        ("\\boxed{50\\%}", "50", True),                     # l. 201-203: percent signs removed
        ("The answer is 6.0 moles", "6", True),            # extract_last_number l. 68-74
        ("12 apples and 3 pears: 15", "15", True),         # the LAST number, not the first
        ("12 apples and 3 pears: 15", "12", False),
        ("1,000 apples", "1000", False),                   # l. 71 has no thousands: "000" = 0
        ("3.", "3", True),                                 # "3." is a number (float("3."))
        ("-4", "-4", True),
        ("0.25", "25", True),                              # math_equal l. 377: gold / 100 accepted
        ("2500", "25", True),                              # gold x 100 accepted
        ("100.009", "100", True),                          # isclose rel_tol 1e-4 (l. 289)
        ("100.02", "100", False),
        ("Friday", "Friday", True),                        # text gold (NumGLUE-cm): l. 366
        ("friday", "Friday", True),                        # l. 362-363: lower-cased first
        ("It is Friday.", "Friday", False),                # no number: the whole text, no match
        ("", "5", False),                                  # l. 394-395
        ("2", "2.0", True),                                # gold normalized: "2.0" -> "2" (l. 244-245)
    ],
)
def test_numglue_math_answers(prediction, gold, hit):
    assert score_task("NumGLUE-ds", [prediction], [gold]) == (100.0 if hit else 0.0)


def test_math_answer_pieces():
    assert find_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"     # nested braces kept
    assert find_boxed("\\boxed 5$ rest") == "5"                          # l. 63-64
    assert find_boxed("no box") == ""
    assert extract_math_answer("x \\boxed{ 2.50 }") == "2.50"           # "0*" then a digit: kept
    assert normalize_math_answer("k = 7") == "7"                         # l. 253-255: short lhs
    assert normalize_math_answer("\\dfrac12") == "\\frac{1}{2}"         # l. 163, _fix_fracs
    assert normalize_math_answer("3/4") == "\\frac{3}{4}"               # _fix_a_slash_b
    assert normalize_math_answer(".5") == "0.5"                          # l. 249-250
    assert normalize_math_answer("7.000 apples.") == "7apples"           # l. 151, 244, 258
    assert parse_number("1,000") == 1000.0 and parse_number("50%") == 0.5 and parse_number("x") is None
    assert math_equal("(3)", "3") and math_equal("y = 4", "4")          # brackets; "y =" (l. 417)


# -- trace: TRACE's whole-string exact match (TRACE metrics.py l. 76-88) ------------------------------
def test_trace_scoring_is_raw_exact_match():
    assert exact_accuracy(["A", " A", "A.", ""], ["A", "A", "A", ""]) == 25.0
    # ScienceQA resolve (TRACE eval_ScienceQA.py l. 10): the first character, unstripped.
    gold = "B\nbecause"
    assert score_task("ScienceQA", ["B\nwhy", " B", "C"], [gold] * 3, scoring="trace") == pytest.approx(100 / 3)
    assert score_task("NumGLUE-ds", ["6.0", "6"], ["6", "6"], scoring="trace") == 50.0
    assert score_task("FOMC", ["A. dovish", "A"], ["A", "A"], scoring="trace") == 50.0


# -- lenient: the answer found inside a chattier generation ----------------------------------------
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


def test_lenient_scoring_on_real_answer_formats():
    science_gold = "B\nA clause is a group of words that contains both a subject and a predicate."
    assert score_task("ScienceQA", ["Answer: B"], [science_gold], scoring="lenient") == 100.0
    assert score_task("FOMC", ["A. dovish"], ["A"], scoring="lenient") == 100.0
    assert score_task("FOMC", ["hawkish"], ["B"], scoring="lenient") == 100.0
    assert score_task("NumGLUE-ds", ["The answer is 2.0"], ["2"], scoring="lenient") == 100.0
    assert score_task("BoolQA", ["False."], ["False"], scoring="lenient") == 100.0
    assert lenient_extractor("agnews") == "first_line" and lenient_extractor("C-STANCE") == "cstance_choice"


def test_accuracy_counts_empty_predictions_as_wrong():
    # hits: "A" == "A", "B" == "B"; "" never matches; "C" != "A": 2 of 4 = 50%
    assert accuracy(["A", "B", "", "C"], ["A", "B", "", "A"]) == 50.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: score_task("Lima", ["x"], ["y"]), "no metric for task 'Lima'"),
        (lambda: score_task("20Minuten", ["x"], ["y"]), "SARI needs the sources"),
        (lambda: score_task("FOMC", ["x"], ["y"], scoring="fuzzy"), "unknown rules 'fuzzy'"),
        (lambda: accuracy(["x"], ["y"], extract="nope"), "unknown strategy 'nope'"),
        (lambda: rouge_l(["a", "b"], ["a"]), r"predictions \(2\), references \(1\) differ in length"),
        (lambda: score_task("FOMC", ["a", "b"], ["a"]), r"predictions \(2\), references \(1\) differ"),
        (lambda: sari(["s"], ["a", "b"], ["a", "b"]), r"sources \(1\) differ in length"),
        (lambda: edit_similarity([], []), "nothing to score"),
    ],
)
def test_metric_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- "olora": O-LoRA's standard-CL exact match (cmnfriend/O-LoRA src/compute_metrics.py) -------------
def test_olora_exact_match_normalises_case_punctuation_and_spaces_only():
    from moram_platform.trace.task_metrics import olora_exact_match, olora_normalize

    # compute_metrics.py:45: white_space_fix(remove_punc(lower(s))); no article removal (l. 31).
    assert olora_normalize("  The  Positive.\n") == "the positive"
    assert olora_normalize("Mean of Transportation!") == "mean of transportation"
    # l. 48-49 equality of the normalised strings; l. 92: 100 * hits / n.
    # "Positive." == "positive" (hit), "positive review" != "positive", "" != "negative",
    # "the Business" != "Business" (the article stays): 1 of 4.
    predictions = ["Positive.", "positive review", "", "the Business"]
    references = ["positive", "positive", "negative", "Business"]
    assert olora_exact_match(predictions, references) == pytest.approx(25.0)
    assert score_task("amazon", predictions, references, scoring="olora") == pytest.approx(25.0)
    # the other rules differ on the same answers: the trace rules compare raw text (0 hits)
    assert score_task("amazon", predictions, references, scoring="trace") == pytest.approx(0.0)
