"""TRACE task metrics, each on a 0-100 scale, under a named set of scoring rules (``SCORINGS``):

- ``"moram-repo"``: exactly as the official MoRAM code scores (``Artificer-AI-Lab/MoRAM``:
  TRACE/inference/infer_multi_command.py, TRACE/metrics.py, TRACE/evaluations/*.py), its quirks
  included and named below;
- ``"trace"``: as TRACE's original code scores (``BeyonderXX/TRACE``: metrics.py, evaluations/);
- ``"lenient"``: a cleaned reading that finds the answer inside a chattier generation;
- ``"olora"``: O-LoRA's standard-CL scoring (``cmnfriend/O-LoRA``: src/compute_metrics.py),
  exact match after its normalisation (``olora_exact_match``).

Metrics: accuracy (C-STANCE, FOMC, ScienceQA, NumGLUE-cm/ds and the standard-CL tasks),
ROUGE-L (MeetingBank; the ``rouge`` package's summary-level "f", as both codes call it),
edit similarity (Py150; ``fuzz.ratio`` on code with literal placeholders restored) and SARI
(20Minuten; as the HF ``evaluate``/``datasets`` metric both codes load). As in both codes, an
empty prediction scores 0 and still counts in the mean.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from .data import STANDARD_CL_TASKS
from .math_answers import math_accuracy

__all__ = [
    "ANSWER_EXTRACTORS", "LENIENT_EXTRACTION", "MORAM_REPO_CHOICE_LABELS", "SCORINGS", "TASK_METRIC",
    "accuracy", "edit_similarity", "exact_accuracy", "extract_choice_letter", "extract_cstance_choice",
    "extract_exact", "extract_first_char", "extract_first_line", "extract_fomc_choice", "extract_number",
    "lenient_extractor", "moram_repo_choice", "olora_exact_match", "olora_normalize", "moram_repo_postprocess", "prefix_accuracy",
    "restore_py150_literals", "rouge_l", "sari", "science_qa_answer", "score_task", "tokenize_13a",
]

SCORINGS = ("moram-repo", "trace", "lenient", "olora")

TASK_METRIC = {
    "C-STANCE": "accuracy",
    "FOMC": "accuracy",
    "MeetingBank": "rouge_l",
    "Py150": "edit_similarity",
    "ScienceQA": "accuracy",
    "NumGLUE-cm": "accuracy",
    "NumGLUE-ds": "accuracy",
    "20Minuten": "sari",
    **{task: "accuracy" for task in STANDARD_CL_TASKS},
}


def _check_lengths(predictions: Sequence[str], references: Sequence, *others: Sequence) -> None:
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    lengths = {len(predictions), len(references), *(len(o) for o in others)}
    if len(lengths) != 1:
        raise ValueError(f"predictions ({len(predictions)}), references ({len(references)})"
                         + "".join(f", sources ({len(o)})" for o in others) + " differ in length")


# -- "moram-repo": the official MoRAM code's answer reading ------------------------------------
# infer_multi_command.py CHOICE_TASK_LABELS: these tasks' generations are turned into a letter
# before scoring. Quirk: the standard-CL tasks among them have WORD labels in the data
# ("False", "negative", "Business"), so a correct word answer becomes a letter ("False" -> "A")
# and fails; only words without a label letter in them survive ("True", "positive", "Sports").
MORAM_REPO_CHOICE_LABELS: dict[str, tuple[str, ...]] = {
    "C-STANCE": tuple("ABC"), "FOMC": tuple("ABC"), "BoolQA": tuple("AB"), "QQP": tuple("AB"),
    "amazon": tuple("ABCD"), "yelp": tuple("ABCD"), "agnews": tuple("ABCD"),
    "dbpedia": tuple("ABCDEFGH"), "yahoo": tuple("ABCDEFGHIJ"),
}


def moram_repo_choice(text: str, labels: Sequence[str]) -> str:
    """infer_multi_command.postprocess_predictions for one generation: the first label letter
    standing alone (case-insensitive, so the article "a" reads as A), else the first character
    anywhere that is a label letter ("neutral" -> "A"), else the stripped text unchanged."""
    text = str(text).strip()
    alone = re.search(rf"\b([{''.join(labels)}])\b", text, re.IGNORECASE)
    if alone:
        return alone.group(1).upper()
    return next((char.upper() for char in text if char.upper() in labels), text)


def moram_repo_postprocess(task: str, predictions: Sequence[str]) -> list[str]:
    """The generations as the official code scores them: letters for ``MORAM_REPO_CHOICE_LABELS``."""
    if task not in MORAM_REPO_CHOICE_LABELS:
        return list(predictions)
    return [moram_repo_choice(p, MORAM_REPO_CHOICE_LABELS[task]) for p in predictions]


def science_qa_answer(text: str) -> str:
    """eval_ScienceQA.resolve (MoRAM): the first character of the stripped text, "N/A" if empty."""
    text = str(text).strip()
    return text[0] if text else "N/A"


def prefix_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """MoRAM metrics.caculate_accuracy: the stripped prediction cut to the reference's length
    equals the (unstripped) reference, i.e. it STARTS WITH it ("Bad movie" counts for "Bad")."""
    _check_lengths(predictions, references)
    hits = 0
    for prediction, reference in zip(predictions, references):
        prediction = str(prediction).strip()
        head = prediction[:min(len(reference), len(prediction))]
        hits += head != "" and reference != "" and head == reference
    return 100.0 * hits / len(predictions)


def _moram_repo_accuracy(task: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_lengths(predictions, references)
    predictions = moram_repo_postprocess(task, predictions)
    if task == "ScienceQA":
        return prefix_accuracy([science_qa_answer(p) for p in predictions],
                               [science_qa_answer(r) for r in references])
    if task in ("NumGLUE-cm", "NumGLUE-ds"):  # eval_NumGLUE_*: the Qwen2.5-Math parser
        return 100.0 * math_accuracy(predictions, references)
    return prefix_accuracy(predictions, references)  # eval_<task>, or eval_QQP for the rest


# -- "trace": TRACE's original reading -----------------------------------------------------------
def exact_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """TRACE metrics.caculate_accuracy: the raw prediction equals the reference (nothing stripped)."""
    _check_lengths(predictions, references)
    hits = sum(p != "" and r != "" and p == r for p, r in zip(predictions, references))
    return 100.0 * hits / len(predictions)


def _trace_accuracy(task: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    if task == "ScienceQA":  # TRACE eval_ScienceQA.resolve: the first character, unstripped
        return exact_accuracy([p[:1] for p in predictions], [r[:1] for r in references])
    return exact_accuracy(predictions, references)


# -- "lenient": the answer found inside a chattier generation ----------------------------------
def extract_exact(text: str) -> str:
    """The whole text, surrounding whitespace removed."""
    return text.strip()


def extract_first_char(text: str) -> str:
    """The first character of the stripped text ("B\\n<reasoning>" -> "B")."""
    return text.strip()[:1]

_TRAILING_PUNCT = ".。!！?？,，;；:："


def extract_first_line(text: str) -> str:
    """The first non-empty line, case-folded, without trailing punctuation ("World." = "world")."""
    for line in text.splitlines():
        if line.strip():
            return line.strip().rstrip(_TRAILING_PUNCT).strip().casefold()
    return ""


# A choice letter that opens the answer: "B", "B.", "(B)", "A.支持", "B\n<reasoning>", but not
# the English article of "A clause is ..." (letter, whitespace, lower-case word).
_LETTER_AT_START = re.compile(r"^\(?([A-E])(?![A-Za-z])(?!\s+[a-z])")
_LETTER_AFTER_CUE = re.compile(
    r"(?:answer|stance|choice|option|答案|态度|选择)\s*(?:is|:|：|为|是)?\s*\(?([A-E])(?![A-Za-z])", re.IGNORECASE)


def _choice_letter(text: str) -> str:
    text = text.strip()
    match = _LETTER_AT_START.match(text) or _LETTER_AFTER_CUE.search(text)
    return match.group(1) if match else ""


def _first_option_word(text: str, words: Mapping[str, str]) -> str:
    found = [(text.casefold().find(word), letter) for word, letter in words.items()]
    found = [(pos, letter) for pos, letter in found if pos >= 0]
    return min(found)[1] if found else ""


def extract_choice_letter(text: str) -> str:
    """Lenient: the choice letter A-E that opens the text, or follows "Answer:"-like cues."""
    return _choice_letter(text)


_FOMC_OPTIONS = {"dovish": "A", "hawkish": "B", "neutral": "C"}
_CSTANCE_OPTIONS = {"支持": "A", "反对": "B", "中立": "C"}


def extract_fomc_choice(text: str) -> str:
    """Lenient FOMC: a choice letter, else the first stance word (dovish/hawkish/neutral)."""
    return _choice_letter(text) or _first_option_word(text, _FOMC_OPTIONS)


def extract_cstance_choice(text: str) -> str:
    """Lenient C-STANCE: a choice letter, else the first stance word (支持/反对/中立)."""
    return _choice_letter(text) or _first_option_word(text, _CSTANCE_OPTIONS)


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def extract_number(text: str) -> str:
    """Lenient numbers: the first number, canonical ("6.0" = "6", "1,000" = "1000",
    "1.4300000000000002" = "1.43": 6 decimals); text without a number falls back to
    ``extract_first_line`` (NumGLUE-cm also has answers like "August")."""
    match = _NUMBER.search(text)
    if not match:
        return extract_first_line(text)
    canonical = f"{round(float(match.group().replace(',', '')), 6):.6f}".rstrip("0").rstrip(".")
    return "0" if canonical == "-0" else canonical


ANSWER_EXTRACTORS: dict[str, Callable[[str], str]] = {
    "exact": extract_exact,
    "first_char": extract_first_char,
    "first_line": extract_first_line,
    "choice_letter": extract_choice_letter,
    "fomc_choice": extract_fomc_choice,
    "cstance_choice": extract_cstance_choice,
    "number": extract_number,
}

# The lenient strategy per task; "*" for every other accuracy task.
LENIENT_EXTRACTION: dict[str, str] = {
    "C-STANCE": "cstance_choice",
    "FOMC": "fomc_choice",
    "ScienceQA": "choice_letter",
    "NumGLUE-cm": "number",
    "NumGLUE-ds": "number",
    "COPA": "choice_letter",
    "*": "first_line",
}


def lenient_extractor(task: str) -> str:
    """The strategy name the lenient scoring uses for ``task``."""
    return LENIENT_EXTRACTION.get(task, LENIENT_EXTRACTION["*"])


def accuracy(predictions: Sequence[str], references: Sequence[str],
             extract: str | Callable[[str], str] = "exact") -> float:
    """Percentage of predictions whose extracted answer equals the reference's (non-empty)."""
    _check_lengths(predictions, references)
    if isinstance(extract, str):
        if extract not in ANSWER_EXTRACTORS:
            raise ValueError(f"extract: unknown strategy {extract!r}; choose one of {', '.join(ANSWER_EXTRACTORS)}")
        extract = ANSWER_EXTRACTORS[extract]
    hits = 0
    for prediction, reference in zip(predictions, references):
        answer = extract(prediction)
        hits += bool(answer) and answer == extract(reference)
    return 100.0 * hits / len(predictions)


# -- "olora": O-LoRA's standard-CL exact match -----------------------------------------------------
def olora_normalize(text: str) -> str:
    """O-LoRA src/compute_metrics.py:32-45 (normalize_answer): lower-case, drop every
    ``string.punctuation`` character, collapse whitespace; SQuAD's rule without removing articles."""
    text = str(text).lower()
    text = "".join(char for char in text if char not in set(string.punctuation))
    return " ".join(text.split())


def olora_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """O-LoRA compute_metrics.py:48-49 and 78-92: the share of predictions whose normalised text
    equals the normalised reference, x 100 (one reference each; "Positive." matches "positive",
    "positive review" does not)."""
    _check_lengths(predictions, references)
    hits = sum(olora_normalize(p) == olora_normalize(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(predictions)


_ACCURACY_RULES: dict[str, Callable[[str, Sequence[str], Sequence[str]], float]] = {
    "moram-repo": _moram_repo_accuracy,
    "trace": _trace_accuracy,
    "lenient": lambda task, predictions, references: accuracy(predictions, references, lenient_extractor(task)),
    "olora": lambda task, predictions, references: olora_exact_match(predictions, references),
}


# -- ROUGE-L (MeetingBank) ---------------------------------------------------------------------
def _rouge_l_f(prediction: str, reference: str) -> float:
    from rouge import Rouge

    try:
        return Rouge(metrics=["rouge-l"]).get_scores(prediction, reference, avg=True)["rouge-l"]["f"]
    except ValueError:  # a text of dots only: no sentence left after splitting on "." (TRACE crashes)
        return 0.0


def rouge_l(predictions: Sequence[str], references: Sequence[str], *, hypothesis_newline: bool = False) -> float:
    """Mean ROUGE-L "f" of the ``rouge`` package (summary level: sentences split on ".",
    distinct words, union LCS; F = 2PR/(P+R+1e-8)) x 100; empty texts score 0 and count.

    ``hypothesis_newline``: the MoRAM metrics.score_rouge quirk, a "\\n" appended to a prediction
    without one; after a final "." it becomes an extra empty word, which lowers precision.
    """
    _check_lengths(predictions, references)
    total = 0.0
    for prediction, reference in zip(predictions, references):
        if prediction == "" or reference == "":
            continue
        if hypothesis_newline and "\n" not in prediction:
            prediction += "\n"
        total += _rouge_l_f(prediction, reference)
    return 100.0 * total / len(predictions)


# -- edit similarity (Py150) -------------------------------------------------------------------
_BARE_LITERALS = {"<NUM_LIT>": "0", "<STR_LIT>": "", "<CHAR_LIT>": ""}
_VALUED_LITERAL = re.compile(r"<(?:STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def restore_py150_literals(code: str) -> str:
    """Py150 placeholders back to code, as TRACE: <NUM_LIT> -> 0, <STR_LIT>/<CHAR_LIT> -> "",
    <NUM_LIT:200> -> 200 (any <KIND_LIT:value> -> value)."""
    for placeholder, value in _BARE_LITERALS.items():
        code = code.replace(placeholder, value)
    return _VALUED_LITERAL.sub(lambda m: m.group(1), code)


def _fuzz_ratio(prediction: str, reference: str, rounded: bool) -> float:
    from rapidfuzz.distance import Indel

    if not prediction or not reference:
        return 0.0
    total = len(prediction) + len(reference)
    ratio = 100 * ((total - Indel.distance(prediction, reference)) / total)
    # fuzzywuzzy (with python-Levenshtein) returns int(round(100 * ratio)): Python's rounding.
    return float(int(round(ratio))) if rounded else ratio


def edit_similarity(predictions: Sequence[str], references: Sequence[str], *, rounded: bool = True) -> float:
    """Mean ``fuzz.ratio`` (0-100): 100 * (1 - indel distance / (len(a) + len(b))), per example
    rounded to an int as fuzzywuzzy does (``rounded=False``: the exact ratio)."""
    _check_lengths(predictions, references)
    return sum(_fuzz_ratio(p, r, rounded) for p, r in zip(predictions, references)) / len(predictions)


# -- SARI (20Minuten) --------------------------------------------------------------------------
# sacreBLEU's 13a tokenizer (mteval-v13a), which HF's SARI applies after lower-casing.
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> str:
    """sacreBLEU's ``13a`` tokenization: space-separated tokens."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        for escaped, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            line = line.replace(escaped, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _sari_ngram(source: list[str], candidate: list[str], references: list[list[str]]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) for one n-gram order; 0/0 counts as 1."""
    n_refs = len(references)
    src = Counter({g: c * n_refs for g, c in Counter(source).items()})
    cand = Counter({g: c * n_refs for g, c in Counter(candidate).items()})
    ref = Counter(g for grams in references for g in grams)

    kept, kept_good, kept_all = src & cand, src & cand & ref, src & ref
    keep_p = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(kept_all.values()) if kept_all else 1.0

    deleted = src - cand
    deleted_good = deleted - ref
    delete_p = sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0

    added = set(cand) - set(src)
    added_good, added_all = added & set(ref), set(ref) - set(src)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(added_all) if added_all else 1.0
    return _f1(keep_p, keep_r), delete_p, _f1(add_p, add_r)


def _sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    src, cand = source.split(" "), prediction.split(" ")
    refs = [r.split(" ") for r in references]
    scores = [_sari_ngram(_ngrams(src, n), _ngrams(cand, n), [_ngrams(r, n) for r in refs]) for n in range(1, 5)]
    keep, delete, add = (sum(s[i] for s in scores) / 4 for i in range(3))
    return (keep + delete + add) / 3


def _normalize_for_sari(text: str) -> str:
    return tokenize_13a(text.lower())


def sari(sources: Sequence[str], predictions: Sequence[str],
         references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Mean sentence SARI x 100. ``references``: one string per example, or a list of them."""
    _check_lengths(predictions, references, sources)
    total = 0.0
    for source, prediction, refs in zip(sources, predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        total += _sari_sentence(_normalize_for_sari(source), _normalize_for_sari(prediction),
                                [_normalize_for_sari(r) for r in refs])
    return 100.0 * total / len(predictions)


def score_task(task: str, predictions: Sequence[str], references: Sequence[str], *,
               sources: Sequence[str] | None = None, scoring: str = "moram-repo") -> float:
    """``task``'s TRACE metric (``TASK_METRIC``), 0-100, under the ``scoring`` rules
    ("moram-repo", "trace" or "lenient"); ``sources`` (the prompts) are needed for SARI."""
    if task not in TASK_METRIC:
        raise ValueError(f"no metric for task {task!r}; known tasks: {', '.join(TASK_METRIC)}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: unknown rules {scoring!r}; choose one of {', '.join(SCORINGS)}")
    metric = TASK_METRIC[task]
    if metric == "accuracy":
        return _ACCURACY_RULES[scoring](task, predictions, references)
    if metric == "rouge_l":
        return rouge_l(predictions, references, hypothesis_newline=scoring == "moram-repo")
    if metric == "edit_similarity":  # both codes use fuzzywuzzy's rounded ratio
        return edit_similarity([restore_py150_literals(p) for p in predictions],
                               [restore_py150_literals(r) for r in references], rounded=scoring != "lenient")
    if sources is None:
        raise ValueError(f"{task}: SARI needs the sources (the prompts)")
    return sari(sources, predictions, references)
