"""Metrics of VQA benchmarks as users compare them: lmms-eval's where it and the original scripts disagree.

VQA accuracy: the leave-one-out formula of GT-Vision-Lab/VQA `vqaEval.py`, with the prediction and every human
answer normalised by EvalAI's processor, as lmms-eval does; ANLS: lmms-eval's (the RRC script's with the raw string
lengths); relaxed accuracy: pix2struct's `relaxed_correctness`; exact match: lmms-eval's GQA task; yes/no parsing:
the POPE evaluation script (lmms-eval requires the exact words "yes"/"no"); OCRBench: its `example.py` script.
"""

from __future__ import annotations

import re
import string

from crop.errors import ConfigError

# fmt: off
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# fmt: on
"""The official VQA contraction table, verbatim (its capitalised keys never fire: words are lowercased first)."""

VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
"""The official VQA `manualMap`: number words up to ten become digits."""

VQA_ARTICLES = frozenset({"a", "an", "the"})

_VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
"""The official `punct` list (each mark is handled on its own, so the order does not matter)."""
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official periodStrip is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a lookahead that can never fail before a
# period, so it removes every period not followed by a digit. The official call passes re.UNICODE as the `count`
# argument (at most 32 removals); that accident is dropped, no short answer holds 32 periods.
_VQA_PERIOD_STRIP = re.compile(r"\.(?!\d)")

HANDWRITTEN_MATH = "Handwritten Mathematical Expression Recognition"
"""The OCRBench category compared with all spaces removed and case kept."""

_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)
_POPE_NEGATIONS = ("No", "not", "no")
_BARE_CHOICE = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_LEADING_CHOICE = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.):])\s")
_ANSWER_PHRASE = re.compile(r"(?i:\b(?:answer|option|choice)\b(?:\s+is)?\s*:?\s*)\(?([A-Z])\b")


def _process_punctuation(text: str) -> str:
    """The official `processPunctuation`: marks next to a space (or any mark in "1,000"-like text) are deleted."""
    delete_all = _VQA_COMMA_STRIP.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words to digits, drop articles, expand contractions."""
    words = [VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words if word not in VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's VQA answer processor, as lmms-eval applies it: lowercase, "," and "?" deleted, "'s" split off, then
    the official punctuation, number-word, article and contraction processing."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: mean over the human answers i of min(1, #other humans agreeing with the prediction / 3).

    As lmms-eval computes it (textvqa, vqav2): the prediction and every human answer go through
    `normalize_vqa_answer`. GT-Vision-Lab's `vqaEval.py` normalises the human answers only when they are not all
    identical; lmms-eval's numbers are the ones users compare against (DESIGN 3). Meant for the 10 answers of
    VQAv2 / TextVQA: with fewer than 4 answers the score cannot reach 1 (one answer: 0).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs the human answers of the question; got an empty list")
    humans = [normalize_vqa_answer(answer) for answer in answers]
    predicted = normalize_vqa_answer(prediction)
    agreeing = sum(human == predicted for human in humans)
    # Leaving human i out removes it from the agreeing count when it agreed; credit in thirds, capped at 3.
    thirds = sum(min(3, agreeing - (human == predicted)) for human in humans)
    return thirds / (3 * len(humans))


def _levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS of DocVQA / InfographicVQA: best over answers of 1 - NL, or 0 where NL > threshold.

    As lmms-eval computes it: the distance is taken between `" ".join(s.strip().lower().split())` forms but divided
    by the longer of the strings as given (the RRC script divides by the normalised lengths; they differ only for
    extra whitespace); two empty strings: NL = 0. NL equal to the threshold keeps its score, as the RRC script,
    pix2struct and lmms-eval do (the ST-VQA paper writes NL < threshold).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"anls threshold must be a normalised distance in [0, 1]; got {threshold}")
    if not answers:
        raise ValueError("anls needs the reference answers of the question; got an empty list")
    predicted = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        reference = " ".join(answer.strip().lower().split())
        longest = max(len(answer), len(prediction))
        distance = _levenshtein(reference, predicted) / longest if longest else 0.0
        if distance <= threshold:
            best = max(best, 1.0 - distance)
    return best


def _to_float(text: str) -> float | None:
    """pix2struct's number parsing: Python `float`, a trailing "%" meaning /100; None when it is not a number."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed correctness (pix2struct): numbers within `tolerance` relative change, else exact match.

    Only surrounding whitespace is stripped from both strings, as lmms-eval's chartqa gets it from its model
    wrappers; nothing else (no trailing period, "$" or thousands separator: "1,000" is compared as text). A zero
    target falls back to the case-insensitive string comparison, as in pix2struct.
    """
    if not tolerance >= 0.0:
        raise ConfigError(f"relaxed_accuracy tolerance must be a relative change >= 0; got {tolerance}")
    prediction, answer = prediction.strip(), answer.strip()
    predicted, target = _to_float(prediction), _to_float(answer)
    if predicted is not None and target:
        return float(abs(predicted - target) / abs(target) <= tolerance)
    return float(prediction.lower() == answer.lower())


def _exact_match_normalize(text: str) -> str:
    return text.lower().translate(_ASCII_PUNCTUATION).strip()


def exact_match(prediction: str, answers: list[str]) -> float:
    """GQA exact match as lmms-eval scores it: lowercase, delete every ASCII punctuation mark, strip; any answer."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer; got an empty list")
    predicted = _exact_match_normalize(prediction)
    return float(any(_exact_match_normalize(answer) == predicted for answer in answers))


def parse_yes_no(prediction: str) -> str:
    """POPE's official parsing: in the text before the first ".", commas removed and split on spaces, a word "No",
    "no" or "not" means "no"; anything else (also "NO" or an empty answer) means "yes"."""
    first_sentence = prediction.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(negation in words for negation in _POPE_NEGATIONS) else "yes"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 ("yes" is positive) and the share of "yes" predictions.

    Predictions are raw texts parsed with `parse_yes_no`; labels are "yes"/"no" (case and surrounding spaces
    ignored). Where a ratio has a zero denominator it is 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope_metrics needs one label per prediction; got {len(predictions)} and {len(labels)}")
    gold = [label.strip().lower() for label in labels]
    wrong = sorted({label for label in gold if label not in ("yes", "no")})
    if wrong:
        raise ValueError(f"POPE labels must be 'yes' or 'no'; got {wrong}")
    said_yes = [parse_yes_no(prediction) == "yes" for prediction in predictions]
    is_yes = [label == "yes" for label in gold]
    true_pos = sum(p and g for p, g in zip(said_yes, is_yes, strict=True))
    true_neg = sum(not p and not g for p, g in zip(said_yes, is_yes, strict=True))
    precision = _ratio(true_pos, sum(said_yes))
    recall = _ratio(true_pos, sum(is_yes))
    return {
        "accuracy": _ratio(true_pos + true_neg, len(gold)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(sum(said_yes), len(gold)),
    }


def _check_n_choices(n_choices: int) -> None:
    if not 1 <= n_choices <= 26:
        raise ConfigError(f"n_choices must be between 1 and 26 (options A to Z); got {n_choices}")


def parse_choice(prediction: str, n_choices: int) -> int | None:
    """Index (A -> 0) of the option letter a multiple-choice answer names, or None; extends LLaVA's ScienceQA rule.

    Tried in order on the stripped text, the first rule that applies decides: (1) the whole answer is one letter,
    any case, optionally in parentheses and/or followed by "." or ":" ("b", "(B)", "B."); (2) it starts with an
    uppercase letter marked as an option and then a space ("B. cat", "B) cat", "(B) cat", "B: cat"); (3) the words
    "answer", "option" or "choice", optionally "is" and ":", then an uppercase letter ("The answer is B.", "Answer:
    (C)"), every such phrase naming the same letter. A letter past the `n_choices` options gives None.
    """
    _check_n_choices(n_choices)
    text = prediction.strip()
    letter = None
    if bare := _BARE_CHOICE.fullmatch(text):
        letter = bare.group(1).upper()
    elif leading := _LEADING_CHOICE.match(text):
        letter = leading.group(1) or leading.group(2)
    else:
        named = set(_ANSWER_PHRASE.findall(text))
        if len(named) == 1:
            letter = named.pop()
    if letter is None:
        return None
    index = ord(letter) - ord("A")
    return index if index < n_choices else None


def multiple_choice_accuracy(prediction: str, answer_index: int, n_choices: int) -> float:
    """1.0 when `parse_choice` finds the correct option in the answer, else 0.0 (ScienceQA, AI2D, lettered options)."""
    _check_n_choices(n_choices)
    if not 0 <= answer_index < n_choices:
        raise ConfigError(f"answer_index must be in [0, {n_choices}) for {n_choices} options; got {answer_index}")
    return float(parse_choice(prediction, n_choices) == answer_index)


def _ocrbench_normalize(text: str, math_expression: bool) -> str:
    if math_expression:
        return text.strip().replace("\n", " ").replace(" ", "")
    return text.lower().strip().replace("\n", " ")


def ocrbench_match(prediction: str, answers: list[str], category: str = "") -> float:
    """OCRBench's rule (official `example.py`): 1.0 when an answer is contained in the prediction, both stripped
    with newlines as spaces and lowercased; for handwritten math, all spaces are removed and case is kept."""
    if not answers:
        raise ValueError("ocrbench_match needs at least one reference answer; got an empty list")
    math_expression = category == HANDWRITTEN_MATH
    predicted = _ocrbench_normalize(prediction, math_expression)
    return float(any(_ocrbench_normalize(answer, math_expression) in predicted for answer in answers))
