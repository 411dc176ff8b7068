"""NumGLUE answers as the official MoRAM code reads them (TRACE/evaluations/qwen_math_parser.py,
adapted there from Qwen2.5-Math's evaluation): the ``\\boxed{...}`` content, else the LAST number
of the generation; compared with the gold within a relative tolerance of 1e-4, the gold x100
and /100 also accepted.

Rules are written out here step by step, in the official order, because the order decides
results (e.g. "and" is removed before spaces are). Deliberately not reproduced:

- ``symbolic_equal``: it parses model text with sympy's ``parse_expr`` (which ``eval``s it). It can
  only matter when one side is not a plain number; NumGLUE golds are plain numbers (ds: all;
  cm: 78 of 81 test answers, the rest single words such as "Friday"), and a last-number
  extraction is always a plain number, so only a digit-free or ``\\boxed{5+5}``-style answer
  could score differently (we count it wrong);
- ``word2number`` (optional there, and absent from its requirements): number words stay words.
"""
from __future__ import annotations

import math
import re

__all__ = ["extract_math_answer", "find_boxed", "last_number", "math_accuracy", "math_equal",
           "normalize_math_answer", "parse_number"]


def find_boxed(text: str) -> str:
    """The content of the last ``boxed{...}`` (nested braces kept), ``boxed 5$`` up to ``$``, or ""."""
    if "boxed" not in text:
        return ""
    tail = text.split("boxed")[-1]
    if not tail:
        return ""
    if tail[0] != "{":
        return tail.split("$")[0].strip()
    depth, content = 1, []
    for char in tail[1:]:
        depth += (char == "{") - (char == "}")
        if depth == 0:
            break
        content.append(char)
    return "".join(content)


_ANY_NUMBER = re.compile(r"-?\d+\.?\d*")  # no thousands separators: "1,000" ends in "000"


def last_number(text: str) -> str:
    """The last number in ``text`` as written ("3." stays "3."), else the stripped text."""
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def _fix_fracs(text: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}; left as it was when a \frac has < 2 chars."""
    head, *parts = text.split("\\frac")
    fixed = head
    for part in parts:
        fixed += "\\frac"
        if part.startswith("{"):
            fixed += part
        elif len(part) < 2:
            return text
        elif part[1] != "{":
            fixed += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            fixed += "{" + part[0] + "}" + part[1:]
    return fixed


def _fix_a_slash_b(text: str) -> str:
    r"""'3/4' -> \frac{3}{4} when both sides are integers written plainly."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    a, b = parts
    try:
        a_value = a if "sqrt" in a else int(a)
        b_value = b if "sqrt" in b else int(b)
    except ValueError:
        return text
    if text != f"{a_value}/{b_value}":
        return text
    return "\\frac{" + str(a_value) + "}{" + str(b_value) + "}"


# (old, new) replacements, in the official order; the regex steps sit between them below.
_LATEX_SPELLINGS = [("\\!", ""), ("bmatrix", "pmatrix"), ("tfrac", "frac"), ("dfrac", "frac"),
                    ("\\neq", "\\ne"), ("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\left", ""), ("\\right", ""),
                    ("\\{", "{"), ("\\}", "}")]
_DEGREES_AND_DOLLARS = [("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", ""), ("\\(", ""), ("\\)", "")]
_VARIABLE_PREFIXES = ["x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to"]
_SETS_AND_PERCENT = [("\\emptyset", "{}"), ("(-\\infty,\\infty)", "\\mathbb{R}"), ("\\%", ""), ("%", ""),
                     (" .", " 0."), ("{.", "{0.")]


def _replace_all(text: str, pairs) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def normalize_math_answer(text: str) -> str:
    """The official ``strip_string``: LaTeX spellings, units, $, %, "x=" prefixes, "2.0" -> "2"."""
    text = str(text).strip().replace("\n", "").rstrip(".")
    text = _replace_all(text, _LATEX_SPELLINGS[:1])
    text = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", text)
    text = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", text)
    text = _replace_all(text, _LATEX_SPELLINGS[1:])
    without_unit = re.sub(r"\\text{.*?}$", "", text).strip()
    if without_unit not in ("", text):
        text = without_unit
    text = _replace_all(text, _DEGREES_AND_DOLLARS)
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    text = _replace_all(text, [(prefix, "") for prefix in _VARIABLE_PREFIXES])
    text = _replace_all(text, _SETS_AND_PERCENT)
    # (The official bracket-unwrapping test requires str.isalnum() of a bracketed string: never true.)
    text = text.replace("infinity", "\\infty")
    if "\\infty" not in text:
        text = text.replace("inf", "\\infty")
    text = _replace_all(text, [("+\\inity", "\\infty"), ("and", ""), ("\\mathbf", "")])
    text = re.sub(r"\\mbox{.*?}", "", text)
    text = _replace_all(text, [("'", ""), ('"', "")])
    if "j" in text and "i" not in text:
        text = text.replace("j", "i")
    text = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", text)
    text = re.sub(r"(\d+)\.0*$", r"\1", text)
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", text).replace(" ", "")
    return _fix_a_slash_b(_fix_fracs(text))


def extract_math_answer(prediction: str) -> str:
    """The boxed answer (normalized), else the last number as written."""
    boxed = find_boxed(prediction)
    return normalize_math_answer(boxed) if boxed else last_number(prediction)


def parse_number(text) -> float | None:
    """float() of the text without commas; "50%" (or "50\\") -> 0.5; None if neither parses."""
    text = str(text).replace(",", "")
    try:
        return float(text)
    except ValueError:
        pass
    text = text[:-1] if text.endswith("%") else text
    text = text[:-1] if text.endswith("\\") else text
    try:
        return float(text) / 100
    except ValueError:
        return None


def _without_brackets(prediction: str, reference: str) -> tuple[str, str]:
    wrapped = ((prediction.startswith("[") and prediction.endswith("]") and not reference.startswith("("))
               or (prediction.startswith("(") and prediction.endswith(")") and not reference.startswith("[")))
    if wrapped:
        prediction, reference = prediction.strip("[]()"), reference.strip("[]()")
    drop = str.maketrans("", "", "{}()")
    return prediction.translate(drop), reference.translate(drop)


def _is_short_equation(text: str) -> bool:
    return text.count("=") == 1 and len(text.split("=")[0].strip()) <= 2


def math_equal(prediction: str, reference: str) -> bool:
    """The official ``math_equal`` without its sympy step (see the module docstring)."""
    if prediction is None or reference is None:
        return False
    if str(prediction).strip().lower() == str(reference).strip().lower():
        return True
    pred_number, ref_number = parse_number(prediction), parse_number(reference)
    if pred_number is not None and ref_number is not None:
        # Both numbers: the verdict is final. Percent readings of the gold count too.
        return any(math.isclose(gold, pred_number, rel_tol=1e-4)
                   for gold in (ref_number / 100, ref_number, ref_number * 100))
    if not prediction:
        return False
    prediction, reference = str(prediction).strip(), str(reference).strip()
    pred_bare, ref_bare = _without_brackets(prediction, reference)
    if pred_bare.lower() == ref_bare.lower():
        return True
    if _is_short_equation(prediction) and "=" not in reference:
        return math_equal(prediction.split("=")[1], reference)
    if _is_short_equation(reference) and "=" not in prediction:
        return math_equal(prediction, reference.split("=")[1])
    return False


def math_accuracy(predictions, references) -> float:
    """Share (0-1) of predictions whose extracted answer equals the normalized gold."""
    hits = sum(math_equal(extract_math_answer(str(p).strip()), normalize_math_answer(str(r).strip()))
               for p, r in zip(predictions, references))
    return hits / len(predictions)
