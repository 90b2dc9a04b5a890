"""IEMOCAP's own release layout -> plan.

``Session{1..5}/dialog/EmoEvaluation/<dialog>.txt`` holds one line per utterance::

    [6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]

(time span, utterance, consensus label, valence/activation/dominance); audio is
``Session{n}/sentences/wav/<dialog>/<utterance>.wav``; transcripts, when present, are
``Session{n}/dialog/transcriptions/<dialog>.txt`` lines ``Ses01F_impro01_F000 [006.2901-008.2357]: text``.

The usual 4 classes: neu, hap + exc (happy), ang, sad; every other IEMOCAP label (fru, sur, fea, dis,
oth, xxx) is dropped and counted; any other label is an error. Fold N = session N is the test split
(leave-one-session-out, as EmoBox); valid is held out of the other sessions (speaker-disjoint, see
``common.hold_out``). Speaker = session + the gender of the utterance's own suffix (``..._M000`` in
``Ses01F_impro01`` is ``Ses01M``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from emorl_pl.datamodules.corpora.common import (
    LabelError,
    Plan,
    PlannedUtterance,
    check_unique_keys,
    hold_out,
    make_key,
)

IEMOCAP_LABELS: dict[str, str] = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}
IEMOCAP_DROPPED = ("fru", "sur", "fea", "dis", "oth", "xxx")
_EVAL_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)\s+\[([^\]]*)\]")
_TRANSCRIPT_LINE = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s*(.*)$")
_UTT = re.compile(r"^Ses(\d\d)[FM]_.+_([FM])\d+$")


def parse_emo_evaluation(path: str | Path) -> list[tuple[int, str, str, float, float, list[float]]]:
    """(line number, utterance id, label, start s, end s, [valence, activation, dominance]) per utterance line.

    Only lines starting with ``[`` are utterance lines (evaluator lines such as ``C-E1:`` are skipped);
    an utterance line that does not parse raises ValueError naming file and line.
    """
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.startswith("["):
            continue
        m = _EVAL_LINE.match(line)
        if m is None:
            raise ValueError(f"{path}:{n}: cannot parse EmoEvaluation line {line!r}; expected "
                             "'[start - end]<TAB>utterance<TAB>label<TAB>[v, a, d]'")
        vad = [float(x) for x in m.group(5).split(",") if x.strip()]
        out.append((n, m.group(3), m.group(4), float(m.group(1)), float(m.group(2)), vad))
    return out


def parse_transcriptions(path: str | Path) -> dict[str, str]:
    """utterance id -> transcript from a ``dialog/transcriptions/<dialog>.txt`` file."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        m = _TRANSCRIPT_LINE.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def iemocap_speaker(utt: str) -> str:
    """``Ses01F_impro01_M000`` -> ``Ses01M``; ValueError for an id that is not IEMOCAP's."""
    m = _UTT.match(utt)
    if m is None:
        raise ValueError(f"not an IEMOCAP utterance id: {utt!r} (expected e.g. Ses01F_impro01_F000)")
    return f"Ses{m.group(1)}{m.group(2)}"


def plan_iemocap(
    root: str | Path,
    *,
    fold: int = 1,
    label_set: tuple[str, ...] | None = None,
    valid_fraction: float = 0.1,
    valid_speakers: Sequence[str] | None = None,
    seed: int = 0,
    with_text: bool = True,
) -> Plan:
    """Plan IEMOCAP from its release folder (``root`` holds ``Session1``..``Session5``); module docstring."""
    root = Path(root)
    sessions = sorted(p for p in root.glob("Session*") if p.is_dir())
    if not sessions:
        raise FileNotFoundError(f"no Session* folders in {root}; expected IEMOCAP's release layout "
                                "(Session1/dialog/EmoEvaluation/*.txt, Session1/sentences/wav/...)")
    numbers = [int(p.name[len("Session"):]) for p in sessions if p.name[len("Session"):].isdigit()]
    if fold not in numbers:
        raise ValueError(f"fold {fold} = Session{fold}, which is not in {root} (sessions: {sorted(numbers)})")
    utterances, dropped = [], Counter()
    for session_dir in sessions:
        session = int(session_dir.name[len("Session"):])
        eval_dir = session_dir / "dialog" / "EmoEvaluation"
        files = sorted(p for p in eval_dir.glob("*.txt") if not p.name.startswith("._"))
        if not files:
            raise FileNotFoundError(f"no EmoEvaluation/*.txt in {eval_dir}")
        for eval_file in files:
            dialog = eval_file.stem
            texts = {}
            transcript = session_dir / "dialog" / "transcriptions" / f"{dialog}.txt"
            if with_text and transcript.is_file():
                texts = parse_transcriptions(transcript)
            for n, utt, code, start, end, vad in parse_emo_evaluation(eval_file):
                if code in IEMOCAP_DROPPED:
                    dropped[code] += 1
                    continue
                if code not in IEMOCAP_LABELS:
                    raise LabelError(f"{eval_file}:{n}: unknown IEMOCAP label {code!r}; allowed: "
                                     f"{', '.join([*IEMOCAP_LABELS, *IEMOCAP_DROPPED])}")
                label = IEMOCAP_LABELS[code]
                if label_set is not None and label not in label_set:
                    dropped[code] += 1
                    continue
                utterances.append(PlannedUtterance(
                    key=make_key("iemocap", utt), path=session_dir / "sentences" / "wav" / dialog / f"{utt}.wav",
                    split="test" if session == fold else "train", label=label, corpus_label=code,
                    corpus="iemocap", speaker=iemocap_speaker(utt), text=texts.get(utt),
                    session=f"Ses{session:02d}", fold=fold,
                    extra={"source": f"{session_dir.name}/sentences/wav/{dialog}/{utt}.wav",
                           "start": start, "end": end, "vad": vad}))
    check_unique_keys(utterances, str(root))
    notes = [f"test: Session{fold} (leave-one-session-out fold {fold})"]
    if valid_fraction > 0 or valid_speakers:
        notes.append(hold_out(utterances, from_split="train", to_split="valid", fraction=valid_fraction,
                              speakers=valid_speakers, seed=seed))
    return Plan("iemocap", utterances, dropped, notes)
