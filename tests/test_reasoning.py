import pytest

from emorl_pl.emotions import UnknownEmotionError
from emorl_pl.reasoning import MODES, check_mode, format_response, instruction, parse_response

LABELS = ("neutral", "happy", "angry", "sad")
ESR = (
    "<think><content>She says she won.</content><acoustics>High pitch, fast rate.</acoustics>"
    "<summary>Good news, excited voice.</summary></think><answer>happy</answer>"
)


def test_check_mode():
    assert MODES == ("ir", "eur", "esr")
    assert check_mode("esr") == "esr"
    with pytest.raises(ValueError, match="unknown response mode 'cot'; known modes: ir, eur, esr"):
        check_mode("cot")


@pytest.mark.parametrize("mode", MODES)
def test_instruction_lists_labels_and_format(mode):
    text = instruction(mode, LABELS)
    assert "neutral, happy, angry, sad" in text
    assert "<answer>label</answer>" in text
    if mode == "ir":
        assert "<think>" not in text
    if mode == "esr":
        for tag in ("<content>", "<acoustics>", "<summary>", "<think>"):
            assert tag in text
        assert "pitch" in text and "speaking rate" in text and "voice quality" in text
    assert instruction(mode, "iemocap4") == text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("label", LABELS)
def test_format_response_round_trips(mode, label):
    text = format_response(mode, label)
    parsed = parse_response(text, mode, LABELS)
    assert parsed.format_ok and parsed.label == label and parsed.answer == label


def test_format_response_uses_fields():
    fields = {"content": "I lost it all.", "acoustics": "Low, slow, breathy.", "summary": "Loss, flat voice."}
    text = format_response("esr", "Sadness", fields)
    parsed = parse_response(text, "esr", LABELS)
    assert parsed.format_ok and parsed.label == "sad"
    assert {k: parsed.fields[k] for k in fields} == fields
    # eur built from a structured record joins the parts into one think.
    eur = parse_response(format_response("eur", "sad", fields), "eur", LABELS)
    assert eur.format_ok and eur.fields["think"] == "I lost it all. Low, slow, breathy. Loss, flat voice."
    assert parse_response(format_response("eur", "sad", {"think": "x"}), "eur", LABELS).fields == {
        "think": "x"
    }


def test_format_response_errors():
    with pytest.raises(ValueError, match="unknown response fields \\['reason'\\]"):
        format_response("esr", "sad", {"reason": "x"})
    with pytest.raises(ValueError, match="'summary' is empty"):
        format_response("esr", "sad", {"summary": "  "})
    with pytest.raises(ValueError, match="'content' contains a reserved tag"):
        format_response("esr", "sad", {"content": "a </content> b"})
    with pytest.raises(UnknownEmotionError):
        format_response("ir", "bored")


def test_valid_esr_with_whitespace_between_tags():
    text = "\n " + ESR.replace("<content>", "\n  <content>").replace("</think>", "\n</think>\n") + "\n"
    p = parse_response(text, "esr", LABELS)
    assert p.format_ok and p.label == "happy"
    assert p.fields["content"] == "She says she won."
    assert p.fields["acoustics"] == "High pitch, fast rate."
    assert p.fields["summary"] == "Good news, excited voice."


@pytest.mark.parametrize(
    "answer, label, ok",
    [
        (" Happy. ", "happy", True),  # case, spaces and punctuation are normalised
        ("excited", "happy", True),  # aliases too
        ("surprise", None, False),  # a real emotion but not in the label set
        ("bored", None, False),
        ("", None, False),
        ("I think happy", None, False),  # no free-text mining: the answer must be a label
    ],
)
def test_answer_text(answer, label, ok):
    p = parse_response(ESR.replace("<answer>happy</answer>", f"<answer>{answer}</answer>"), "esr", LABELS)
    assert (p.format_ok, p.label) == (ok, label)
    assert p.answer == answer.strip()


@pytest.mark.parametrize(
    "text, label",
    [
        ("Hello " + ESR, "happy"),  # text before
        (ESR + " Hope this helps.", "happy"),  # text after
        (ESR.replace("<summary>Good news, excited voice.</summary>", ""), "happy"),  # missing field
        (ESR.replace("Good news, excited voice.", "  "), "happy"),  # empty field
        (
            ESR.replace("<content>She says she won.</content>", "").replace(
                "</acoustics>", "</acoustics><content>She says she won.</content>"
            ),
            "happy",
        ),  # order
        (ESR.replace("</answer>", "</answer><answer>sad</answer>"), "sad"),  # two answers: last wins
        (ESR.replace("<think>", "<Think>"), "happy"),  # tags are lower case
        (ESR.replace("<think>", "<think>x"), "happy"),  # text between container tags
        (ESR.replace("</think>", "</think> so "), "happy"),  # text between think and answer
        (ESR.replace("</answer>", ""), "happy"),  # unclosed answer (truncated output)
        (ESR.replace("</content>", ""), "happy"),  # unclosed field
        (ESR.replace("<answer>happy</answer>", "<answer><answer>happy</answer></answer>"), "happy"),  # nested
        (ESR.replace("<content>", "<content><think>").replace("</content>", "</think></content>"), "happy"),
        (ESR.replace("<answer>happy</answer>", "happy"), None),  # no answer tag, and not a bare label
    ],
)
def test_esr_strict_failures_and_lenient_label(text, label):
    p = parse_response(text, "esr", LABELS)
    assert not p.format_ok
    assert p.label == label


def test_mode_specific_templates():
    eur = "<think>Fast and loud, shouting about the delay.</think><answer>angry</answer>"
    ir = "<answer>angry</answer>"
    assert parse_response(ir, "ir", LABELS).format_ok
    assert parse_response(eur, "eur", LABELS).format_ok
    assert parse_response(ESR, "esr", LABELS).format_ok
    # Each mode rejects the others' templates but still reads their label.
    for text, mode in [(eur, "ir"), (ESR, "ir"), (ir, "eur"), (ESR, "eur"), (ir, "esr"), (eur, "esr")]:
        p = parse_response(text, mode, LABELS)
        assert not p.format_ok and p.label in ("angry", "happy")
    # Stray esr tags inside eur reasoning are not allowed.
    assert not parse_response(
        "<think><summary>loud</summary></think><answer>angry</answer>", "eur", LABELS
    ).format_ok
    assert not parse_response("<think> </think><answer>angry</answer>", "eur", LABELS).format_ok


def test_bare_label_without_tags():
    p = parse_response("  Happy.\n", "esr", LABELS)
    assert (p.format_ok, p.label, p.answer) == (False, "happy", "Happy.")
    p = parse_response("ang", "ir", LABELS)
    assert (p.format_ok, p.label) == (False, "angry")
    p = parse_response("The speaker is happy", "ir", LABELS)
    assert (p.format_ok, p.label, p.answer) == (False, None, None)
    assert parse_response("", "ir", LABELS).label is None


def test_unclosed_answer_stops_at_other_tags_and_end():
    p = parse_response("<think>hm</think><answer> sad", "eur", LABELS)
    assert (p.format_ok, p.label, p.answer) == (False, "sad", "sad")
    # A closing tag of another kind inside the unclosed answer is dropped, not glued onto the label.
    assert parse_response("<answer>sad</think>", "ir", LABELS).label == "sad"


def test_label_set_by_name_and_unknown_set():
    assert parse_response("<answer>happy</answer>", "ir", "iemocap4").format_ok
    with pytest.raises(UnknownEmotionError):
        parse_response("<answer>happy</answer>", "ir", "nope")
    with pytest.raises(ValueError, match="unknown response mode"):
        parse_response("<answer>happy</answer>", "xyz", LABELS)
