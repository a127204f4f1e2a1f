"""The one internal record type every data source maps to.

An :class:`EditRecord` is one edit request ``prompt -> target`` with what is needed to score it:
paraphrases of the prompt (generalization), locality prompts whose answers must not change, and
optional portability (multi-hop) prompts whose answers follow from the edit. Targets and answers
are stored WITHOUT a leading space; the tokenizer adds it (``ultraedit.tokenization``).

Validation happens at construction: a wrong type or an empty string raises
:class:`RecordValidationError` whose ``field`` names the offending field (e.g. ``"paraphrases[2]"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["EditRecord", "LocalityPrompt", "RecordValidationError"]


class RecordValidationError(ValueError):
    """A record field has a wrong type or value. ``field`` is the field's name (with an index for
    list items, e.g. ``"locality[1].prompt"``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def _text(value: Any, name: str, *, strip: bool = True) -> str:
    """Check that ``value`` is a non-empty string; return it stripped of surrounding whitespace
    when ``strip`` (targets and answers), or with only trailing whitespace removed (prompts)."""
    if not isinstance(value, str):
        raise RecordValidationError(name, f"expected a string, got {type(value).__name__}")
    out = value.strip() if strip else value.rstrip()
    if not out.strip():
        raise RecordValidationError(name, "empty string")
    return out


def _optional_text(value: Any, name: str) -> Optional[str]:
    return None if value is None else _text(value, name)


def _list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise RecordValidationError(name, f"expected a list, got {type(value).__name__}")
    return list(value)


@dataclass(frozen=True)
class LocalityPrompt:
    """A prompt whose prediction must not change under the edit.

    ``answer`` is the data set's expected answer (no leading space), or None when the data set
    gives none; metrics then compare against the unedited model's own predictions only.
    """

    prompt: str
    answer: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "prompt", _text(self.prompt, "prompt", strip=False))
        object.__setattr__(self, "answer", _optional_text(self.answer, "answer"))

    @classmethod
    def coerce(cls, value: Any, name: str = "locality") -> "LocalityPrompt":
        """Accept a LocalityPrompt, a prompt string, a ``(prompt, answer)`` pair or a dict with
        ``prompt`` and optional ``answer``; errors name ``name`` and the inner field."""
        try:
            if isinstance(value, LocalityPrompt):
                return value
            if isinstance(value, str):
                return cls(value, None)
            if isinstance(value, (list, tuple)) and len(value) == 2:
                return cls(value[0], value[1])
            if isinstance(value, dict):
                if "prompt" not in value:
                    raise RecordValidationError("prompt", "missing")
                return cls(value["prompt"], value.get("answer"))
        except RecordValidationError as err:
            raise RecordValidationError(f"{name}.{err.field}", str(err).split(": ", 1)[1]) from None
        raise RecordValidationError(name, "expected a prompt string, a (prompt, answer) pair or "
                                          f"a dict, got {type(value).__name__}")

    def to_dict(self) -> Dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer}


@dataclass
class EditRecord:
    """One edit request ``prompt -> target`` with its evaluation prompts.

    Fields:
        prompt: the rewrite prompt, e.g. ``"The capital of France is"`` (trailing space removed).
        target: the new answer, e.g. ``"Rome"`` (stored without the leading space).
        paraphrases: other phrasings of ``prompt`` that should now also yield ``target``.
        locality: :class:`LocalityPrompt` items whose predictions must not change.
        subject, relation: optional metadata (``"France"``, ``"capital"``).
        target_true: the answer before the edit (``"Paris"``), when known.
        portability: ``(prompt, answer)`` pairs whose answer follows from the edit (multi-hop).
        extra: free-form metadata from the source (never used by metrics).
        questions: ``{prompt: question}`` for the record's prompts (rewrite, paraphrases,
            locality, portability) that the source also asks as a question
            (``"What is the capital of France?"``); the WILD-style scores ask those in a QA
            format (``ultraedit.eval.wild``), every other prompt as it is.
    """

    prompt: str
    target: str
    paraphrases: List[str] = field(default_factory=list)
    locality: List[LocalityPrompt] = field(default_factory=list)
    subject: Optional[str] = None
    relation: Optional[str] = None
    target_true: Optional[str] = None
    portability: List[Tuple[str, str]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)
    questions: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.prompt = _text(self.prompt, "prompt", strip=False)
        self.target = _text(self.target, "target")
        self.paraphrases = [_text(p, f"paraphrases[{i}]", strip=False)
                            for i, p in enumerate(_list(self.paraphrases, "paraphrases"))]
        self.locality = [LocalityPrompt.coerce(x, f"locality[{i}]")
                         for i, x in enumerate(_list(self.locality, "locality"))]
        self.subject = _optional_text(self.subject, "subject")
        self.relation = _optional_text(self.relation, "relation")
        self.target_true = _optional_text(self.target_true, "target_true")
        pairs = []
        for i, item in enumerate(_list(self.portability, "portability")):
            if isinstance(item, dict):
                item = (item.get("prompt"), item.get("answer"))
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise RecordValidationError(f"portability[{i}]", "expected a (prompt, answer) pair")
            pairs.append((_text(item[0], f"portability[{i}].prompt", strip=False),
                          _text(item[1], f"portability[{i}].answer")))
        self.portability = pairs
        if self.extra is None:
            self.extra = {}
        if not isinstance(self.extra, dict):
            raise RecordValidationError("extra", f"expected a dict, got {type(self.extra).__name__}")
        if self.questions is None:
            self.questions = {}
        if not isinstance(self.questions, dict):
            raise RecordValidationError("questions",
                                        f"expected a dict, got {type(self.questions).__name__}")
        self.questions = {_text(k, "questions", strip=False):
                          _text(v, f"questions[{k!r}]", strip=False)
                          for k, v in self.questions.items()}

    def as_request(self) -> Dict[str, str]:
        """The edit request the editor consumes: ``{"prompt", "target"}`` and ``"subject"``
        when the record has one (``positions="subject"`` needs it)."""
        req = {"prompt": self.prompt, "target": self.target}
        if self.subject is not None:
            req["subject"] = self.subject
        return req

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serializable dict; :meth:`from_dict` inverts it."""
        return {
            "prompt": self.prompt, "target": self.target, "paraphrases": list(self.paraphrases),
            "locality": [x.to_dict() for x in self.locality], "subject": self.subject,
            "relation": self.relation, "target_true": self.target_true,
            "portability": [list(p) for p in self.portability], "extra": dict(self.extra),
            "questions": dict(self.questions),
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "EditRecord":
        """Build a record from :meth:`to_dict` output; unknown keys raise naming the key."""
        if not isinstance(data, dict):
            raise RecordValidationError("record", f"expected a dict, got {type(data).__name__}")
        known = {"prompt", "target", "paraphrases", "locality", "subject", "relation",
                 "target_true", "portability", "extra", "questions"}
        for key in data:
            if key not in known:
                raise RecordValidationError(str(key), "unknown field")
        for key in ("prompt", "target"):
            if key not in data:
                raise RecordValidationError(key, "missing")
        return cls(**data)


def drop_edited_locality(records):
    """Drop locality prompts that are themselves edited (a rewrite prompt or a paraphrase of
    any record in ``records``): their predictions are meant to change."""
    import dataclasses

    edited = set()
    for r in records:
        edited.add(r.prompt)
        edited.update(r.paraphrases)
    return [dataclasses.replace(r, locality=[lp for lp in r.locality if lp.prompt not in edited])
            for r in records]
