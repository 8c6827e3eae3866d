"""Official VQA benchmark metrics against hand-computed values, the tricky cases of each official script included."""

from __future__ import annotations

import math

import pytest

from crop.errors import ConfigError
from crop.evaluation.metrics import (
    HANDWRITTEN_MATH,
    _levenshtein,
    anls,
    exact_match,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    ocrbench_match,
    parse_choice,
    parse_yes_no,
    pope_metrics,
    relaxed_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),  # a period not followed by a digit goes
        ("  Yes\n", "yes"),
        ("two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the number map stops at ten
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple and the pear", "apple and pear"),
        ("dont", "don't"),
        ("whats up", "what's up"),
        ("Im", "im"),  # the official table's capitalised keys never fire: words are lowercased first
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # a digit-comma-digit anywhere deletes every mark instead of spacing it
        ("red, white", "red white"),  # a mark next to a space is deleted
        ("black/white", "black white"),  # a mark between letters becomes a space
        ("t-shirt", "t shirt"),
        ("why?", "why"),
        ("Mr. Smith", "mr smith"),
        ("it's", "it 's"),  # EvalAI splits "'s" off; the apostrophe is not in the official mark list
        ("", ""),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


# With n human answers of which k match the prediction, leaving out a matching one leaves k - 1 matches and a
# non-matching one leaves k: accuracy = (k * min(1, (k-1)/3) + (n-k) * min(1, k/3)) / n.
@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("two", ["2"] + ["3"] * 9, 0.3),  # k=1: (1*0 + 9*1/3) / 10
        ("Yes.", ["yes"] * 2 + ["no"] * 8, 0.6),  # k=2: (2*1/3 + 8*2/3) / 10 = 18/30
        ("What's it", ["whats it"] * 3 + ["no"] * 7, 0.0),  # "what 's it" against "what's it": EvalAI splits "'s"
        ("a dog", ["dog"] * 3 + ["cat"] * 7, 0.9),  # k=3: (3*2/3 + 7*1) / 10
        ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),  # k=4: every leave-one-out subset keeps >= 3 matches
        ("bird", ["dog"] * 3 + ["cat"] * 7, 0.0),
        ("", ["yes"] * 10, 0.0),
        ("Two", ["2"] * 10, 1.0),  # identical answers are compared as given, the prediction is normalised
        ("two", ["two"] * 10, 1.0),  # every answer is normalised, as lmms-eval does (vqaEval.py would give 0.0)
        ("yes", ["yes\n", "yes", "yes ", "yes"] + ["no"] * 6, 1.0),  # answers are stripped first
        ("blue", ["red", "blue", "blue"], 4 / 9),  # k=2, n=3: (2*1/3 + 1*2/3) / 3
        ("yes", ["yes"], 0.0),  # one answer: no other human can agree
    ],
)
def test_vqa_accuracy(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="empty list"):
        vqa_accuracy("yes", [])


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("kitten", "sitting", 3), ("sitting", "kitten", 3), ("flaw", "lawn", 2), ("saturday", "sunday", 3)]
    + [("", "abc", 3), ("abc", "", 3), ("", "", 0), ("abc", "abc", 0), ("abc", "xyz", 3), ("ab", "ba", 2)],
)
def test_levenshtein(a, b, expected):
    assert _levenshtein(a, b) == expected


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Denver Broncos", ["Denver Broncos"], 1.0),
        ("  denver   BRONCOS ", ["Denver Broncos"], 1.0),  # case and spacing are normalised
        ("Denver Bronco", ["Denver Broncos"], 1 - 1 / 14),
        ("Denver Bronco  ", ["Denver Broncos"], 1 - 1 / 15),  # lmms-eval divides by the longer string as given
        ("12/15/89", ["12/15/88"], 1 - 1 / 8),
        ("kitten", ["sitting"], 1 - 3 / 7),
        ("abcdezzzz", ["abcdefghi"], 1 - 4 / 9),  # NL = 4/9 just below 0.5
        ("abzz", ["abcd"], 0.5),  # NL = 2/4 at the threshold keeps its score (official scripts)
        ("abcdzzzzz", ["abcdefghi"], 0.0),  # NL = 5/9 just above 0.5
        ("abc", ["xyz"], 0.0),
        ("Dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"], 1.0),  # best over the answers
        ("", [""], 1.0),
        ("", ["abc"], 0.0),
    ],
)
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_anls_threshold():
    assert anls("abzz", ["abcd"], threshold=0.4) == 0.0  # NL = 0.5 > 0.4
    assert anls("abcz", ["abcd"], threshold=0.25) == 0.75  # NL = 0.25 at the threshold
    assert anls("abcd", ["abcd"], threshold=0.0) == 1.0


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan])
def test_anls_rejects_bad_threshold(threshold):
    with pytest.raises(ConfigError, match=r"threshold must be .* \[0, 1\]"):
        anls("a", ["a"], threshold=threshold)


def test_anls_needs_answers():
    with pytest.raises(ValueError, match="empty list"):
        anls("a", [])


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("45%", "0.45", 1.0),  # 45/100 = 0.45
        ("0.45", "45%", 1.0),
        ("45", "45%", 0.0),  # 45 against 0.45
        ("105", "100", 1.0),  # relative change 5/100 = 0.05, the boundary is included
        ("95", "100", 1.0),
        ("105.1", "100", 0.0),  # 0.051
        ("94.9", "100", 0.0),
        ("-10.4", "-10", 1.0),  # 0.4/10 = 0.04
        ("0", "0", 1.0),  # a zero target is compared as text
        ("0.0", "0", 0.0),
        ("0.01", "0", 0.0),
        ("Yes", "yes", 1.0),  # text: case-insensitive exact match
        (" 12 ", "12", 1.0),  # surrounding whitespace is stripped
        ("Germany", "germany ", 1.0),
        ("yes.", "yes", 0.0),  # nothing else is stripped
        ("1,000", "1000", 0.0),  # "1,000" is not a float, so it is compared as text
        ("12", "twelve", 0.0),
        ("", "12", 0.0),
    ],
)
def test_relaxed_accuracy(prediction, answer, expected):
    assert relaxed_accuracy(prediction, answer) == expected


def test_relaxed_accuracy_tolerance():
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0  # 10/100 = 0.1
    assert relaxed_accuracy("101", "100", tolerance=0.0) == 0.0
    with pytest.raises(ConfigError, match="tolerance must be .* >= 0"):
        relaxed_accuracy("1", "1", tolerance=-0.01)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Yes", ["yes"], 1.0),
        ("yes.", ["yes"], 1.0),
        (" left\n", ["left"], 1.0),
        ("Left.", ["right", "left"], 1.0),
        ("t-shirt", ["T-shirt"], 1.0),
        ("tshirt", ["t-shirt"], 1.0),  # every punctuation mark goes, on both sides
        ("Don't", ["dont"], 1.0),
        ("the dog", ["dog"], 0.0),  # no article removal
        ("2", ["two"], 0.0),  # no number words
        ("yes, it is", ["yes"], 0.0),
        ("no", ["yes"], 0.0),
        ("", ["yes"], 0.0),
    ],
)
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


def test_exact_match_needs_answers():
    with pytest.raises(ValueError, match="empty list"):
        exact_match("yes", [])


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No.", "no"),
        (" no", "no"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes. But not the red one.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # only "No", "no" and "not" are negations (official script)
        ("I don't see one", "yes"),
        ("No\nthere is none", "yes"),  # words are split on spaces only: "No\nthere" is one word
        ("", "yes"),
    ],
)
def test_parse_yes_no(prediction, expected):
    assert parse_yes_no(prediction) == expected


def _pope(accuracy, precision, recall, f1, yes_ratio):
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}


# TP: said yes to a yes; FP: yes to a no; FN: no to a yes; TN: no to a no.
@pytest.mark.parametrize(
    ("predictions", "labels", "expected"),
    [
        (["yes", "no"], ["yes", "no"], _pope(1.0, 1.0, 1.0, 1.0, 0.5)),
        (["no", "yes"], ["yes", "no"], _pope(0.0, 0.0, 0.0, 0.0, 0.5)),  # TP=0, FP=1, FN=1
        (["no", "no"], ["yes", "no"], _pope(0.5, 0.0, 0.0, 0.0, 0.0)),  # no yes said: precision 0/0 -> 0
        (["no", "yes"], ["no", "no"], _pope(0.5, 0.0, 0.0, 0.0, 0.5)),  # no yes label: recall 0/0 -> 0
        (["No"], ["yes"], _pope(0.0, 0.0, 0.0, 0.0, 0.0)),
        ([], [], _pope(0.0, 0.0, 0.0, 0.0, 0.0)),
        # TP=1, FP=3: precision 1/4, recall 1/1, F1 = 2 * 1/4 / (5/4) = 0.4
        (["yes"] * 4, ["yes", "no", "no", "no"], _pope(0.25, 0.25, 1.0, 0.4, 1.0)),
        # TP=2, FN=2, FP=1, TN=5: precision 2/3, recall 2/4, F1 = (2/3) / (7/6) = 4/7, yes said 3 of 10
        (
            ["yes", "yes", "no", "no", "yes", "no", "no", "no", "no", "no"],
            ["yes"] * 4 + ["no"] * 6,
            _pope(0.7, 2 / 3, 0.5, 4 / 7, 0.3),
        ),
        # raw texts parse to yes, no, no, yes ("NO" is not a negation): TP=1, TN=2, FP=1; F1 = 1 / 1.5
        (
            ["Yes, there is.", "No.", "There is not.", "NO"],
            ["yes", "no", "no", "no"],
            _pope(0.75, 0.5, 1.0, 2 / 3, 0.5),
        ),
        (["Yes.", "no"], [" Yes", "NO "], _pope(1.0, 1.0, 1.0, 1.0, 0.5)),  # labels: case and spaces ignored
    ],
)
def test_pope_metrics(predictions, labels, expected):
    assert pope_metrics(predictions, labels) == pytest.approx(expected, abs=1e-12)


def test_pope_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="one label per prediction; got 2 and 1"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match=r"'yes' or 'no'; got \['maybe'\]"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])


@pytest.mark.parametrize(
    ("prediction", "n_choices", "expected"),
    [
        ("B", 4, 1),
        ("b", 4, 1),
        ("B.", 4, 1),
        ("(B)", 4, 1),
        ("C:", 4, 2),
        ("  D\n", 4, 3),
        ("B. a cat", 4, 1),
        ("(A) a dog", 4, 0),
        ("C) red", 4, 2),
        ("The answer is B.", 4, 1),
        ("Answer: (C)", 4, 2),
        ("The correct option is D", 4, 3),
        ("E", 4, None),  # past the options
        ("E", 5, 4),
        ("A cat", 4, None),  # an article, not an option
        ("The answer is a cat.", 4, None),  # lowercase after the phrase is not an option letter
        ("The answer is A or the answer is B", 4, None),  # the phrases disagree
        ("I think it is blue", 4, None),
        ("", 4, None),
    ],
)
def test_parse_choice(prediction, n_choices, expected):
    assert parse_choice(prediction, n_choices) == expected


@pytest.mark.parametrize(
    ("prediction", "answer_index", "n_choices", "expected"),
    [
        ("B", 1, 4, 1.0),
        ("B", 0, 4, 0.0),
        ("b", 1, 2, 1.0),
        ("The answer is A.", 0, 2, 1.0),
        ("(C) blue", 2, 3, 1.0),
        ("Z", 25, 26, 1.0),
        ("E", 3, 4, 0.0),
        ("blue", 2, 3, 0.0),
        ("", 0, 4, 0.0),
        ("A", 0, 1, 1.0),
    ],
)
def test_multiple_choice_accuracy(prediction, answer_index, n_choices, expected):
    assert multiple_choice_accuracy(prediction, answer_index, n_choices) == expected


@pytest.mark.parametrize("n_choices", [0, 27])
def test_choice_rejects_bad_option_count(n_choices):
    with pytest.raises(ConfigError, match=r"between 1 and 26 \(options A to Z\)"):
        parse_choice("A", n_choices)
    with pytest.raises(ConfigError, match="between 1 and 26"):
        multiple_choice_accuracy("A", 0, n_choices)


@pytest.mark.parametrize("answer_index", [-1, 4])
def test_multiple_choice_rejects_bad_answer_index(answer_index):
    with pytest.raises(ConfigError, match=r"answer_index must be in \[0, 4\)"):
        multiple_choice_accuracy("A", answer_index, 4)


@pytest.mark.parametrize(
    ("prediction", "answers", "category", "expected"),
    [
        ("The text says HELLO world", ["hello"], "", 1.0),  # contained, case ignored
        ("hello", ["Hello World"], "", 0.0),  # the answer must be inside the prediction, not the reverse
        ("  Stop  ", ["stop"], "Regular Text Recognition", 1.0),
        ("line one\nline two", ["one line"], "", 1.0),  # newlines become spaces
        ("The answer is 42.", ["42"], "", 1.0),
        ("4 2", ["42"], "", 0.0),  # spaces count outside handwritten math
        ("abc", ["xyz", "ab"], "", 1.0),  # any answer
        ("", ["a"], "", 0.0),
        ("x ^ { 2 } + 1", ["x^{2}+1"], HANDWRITTEN_MATH, 1.0),  # all spaces removed
        ("\\frac { a } \n { b }", ["\\frac{a}{b}"], HANDWRITTEN_MATH, 1.0),
        ("X^{2}", ["x^{2}"], HANDWRITTEN_MATH, 0.0),  # case kept
        ("x ^ { 2 }", ["x^{2}"], "Scene Text-centric VQA", 0.0),
    ],
)
def test_ocrbench_match(prediction, answers, category, expected):
    assert ocrbench_match(prediction, answers, category) == expected


def test_ocrbench_match_needs_answers():
    with pytest.raises(ValueError, match="empty list"):
        ocrbench_match("a", [])
