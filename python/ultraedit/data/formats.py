"""Loaders for the knowledge-editing data formats the field ships, mapped to :class:`EditRecord`.

``load_records(path, format="auto")`` reads a ``.json`` file (a list of records, or an object with
the list under ``"data"``/``"records"``) or a ``.jsonl`` file (one record per line) and maps every
record with the format's field table below. A record that does not fit raises
:class:`DataFormatError` naming the file, the record's 0-based index and the source field.

Field mapping (source key -> EditRecord field; ``a | b`` = the first key present is used):

zsre (MEND / MALMEN / RLEdit / UltraEdit ``zsre_mend_*.json``)::

    src                       -> prompt
    alt                       -> target          (required and non-empty: a record without a new
                                                  target is an error, never an edit towards
                                                  its own true answer)
    answers[0] | pred         -> target_true
    rephrase                  -> paraphrases      (a string or a list)
    loc, loc_ans              -> locality = [(loc, loc_ans)]
    subject                   -> subject
    src, rephrase, loc        -> questions: asked as they are (the ``"nq question: "`` prefix
                                 of ``loc`` dropped) by the WILD-style scores
    portability{New Question, New Answer} | portability[...] -> portability   (EasyEdit variant)
    other keys (pred, cond, ...) -> extra

counterfact (ROME / MEMIT ``counterfact.json``)::

    requested_rewrite.prompt.format(subject) -> prompt   (the prompt holds "{}")
    requested_rewrite.target_new.str         -> target
    requested_rewrite.target_true.str        -> target_true
    requested_rewrite.subject                -> subject
    requested_rewrite.relation_id            -> relation
    paraphrase_prompts                       -> paraphrases
    neighborhood_prompts                     -> locality, answer = target_true.str
    case_id, attribute_prompts, generation_prompts -> extra

fever (MEND / KnowledgeEditor binary fact-checking editing split)::

    input | claim | src | prompt             -> prompt
    alternatives[0] | alt | target           -> target  (else the flipped label of target_true)
    prediction | label | output[0].answer    -> target_true
    filtered_rephrases | rephrases | rephrase -> paraphrases
    loc, loc_ans                             -> locality (when present)

wikibigedit (Thede et al., 2025)::

    update                    -> prompt
    ans                       -> target
    rephrase                  -> paraphrases      (GS, as the UltraEdit paper scores it)
    personas                  -> extra["personas"] (the paper scores them apart from GS)
    loc, loc_ans              -> locality
    mhop, mhop_ans            -> portability      (when both are non-empty)
    subject, relation | tag   -> subject, relation; other keys -> extra

ultraeditbench (UltraEdit, Gu et al., 2025; the layout its reference loader reads)::

    prompt -> prompt; ans -> target; rephrase_prompt -> paraphrases; loc, loc_ans -> locality

and the zsRE-style keys above (``src``/``alt``/``rephrase``), with EasyEdit's ``target_new``/
``locality_prompt``/``locality_ground_truth`` accepted as aliases: the zsre mapping. Auto-
detection reads ``prompt`` + ``ans`` as ultraeditbench, zsRE-keyed files as zsre (the same
mapping), and a file under EasyEdit's names whose ``locality_prompt`` is a zsRE "nq question:
..." as ultraeditbench (so its locality questions are asked as in zsre).

easyedit (EasyEdit's ``prompt``/``target_new`` files, incl. KnowEdit)::

    prompt -> prompt; target_new -> target; ground_truth -> target_true
    rephrase_prompt | rephrase -> paraphrases; subject -> subject
    locality_prompt + locality_ground_truth -> locality, or
    locality{kind: [{prompt, ground_truth}]} -> locality (ground_truth lists: first item)
    portability{kind: [{prompt, ground_truth}]} -> portability

records: this project's own ``EditRecord.to_dict()`` output.

Questions (every format but records): a prompt, paraphrase, locality or portability prompt that
ends with "?" is kept as its own question (``EditRecord.questions``), which the WILD-style
scores ask in a QA format; zsre adds its ``loc`` questions without the "nq question: " prefix.

These mappings follow the public formats as published with each data set and reference code; the
zsre, counterfact and easyedit keys are the widely used ones, the fever, wikibigedit and
ultraeditbench keys are taken from the data sets' published descriptions and should be checked
against a real file when one is at hand (an unknown layout fails loudly, naming the field).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .records import EditRecord, LocalityPrompt, RecordValidationError

__all__ = ["FORMATS", "DataFormatError", "load_records", "read_records", "save_records",
           "detect_format", "read_raw", "map_record"]


class DataFormatError(ValueError):
    """A record in a data file does not fit its format: ``path``, ``index`` (0-based record
    index, None for file-level problems), ``field`` (the source key) and, in a JSON Lines
    file, ``line`` (1-based, blank lines counted) name where."""

    def __init__(self, path: str, index: Optional[int], field: Optional[str], message: str,
                 line: Optional[int] = None):
        self.path, self.index, self.field, self.line = path, index, field, line
        where = str(path)
        if index is not None:
            where += f": record {index}"
            if line is not None:
                where += f" (line {line})"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")


class _FieldError(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(message)


def _get(rec: dict, *keys: str, required: bool = False, default=None):
    """(key, value) of the first of ``keys`` present in ``rec`` (not None); (keys[0], default)
    when none is, or a _FieldError naming keys[0] when ``required``."""
    for key in keys:
        if key in rec and rec[key] is not None:
            return key, rec[key]
    if required:
        raise _FieldError(" | ".join(keys), "missing")
    return keys[0], default


def _str(key: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _FieldError(key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _FieldError(key, "empty string")
    return value


def _str_list(key: str, value: Any, allow_str: bool = True) -> List[str]:
    """A list of strings (or, when ``allow_str``, one string) -> list of the non-empty ones."""
    if value is None:
        return []
    if isinstance(value, str) and allow_str:
        return [value] if value.strip() else []
    if not isinstance(value, list):
        raise _FieldError(key, f"expected a list of strings, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _FieldError(f"{key}[{i}]", f"expected a string, got {type(item).__name__}")
        if item.strip():
            out.append(item)
    return out


def _first_answer(key: str, value: Any) -> Optional[str]:
    """An answer given as a string, a list (first item, possibly nested) or a {"str": ...}."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if value is None:
        return None
    if not isinstance(value, str):
        raise _FieldError(key, f"expected a string answer, got {type(value).__name__}")
    return value if value.strip() else None


def _extra(rec: dict, used: Sequence[str]) -> Dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in used}


# ----------------------------------------------------------------------------------- formats --
_NQ_PREFIX = "nq question:"


def _nq_question(text: str) -> str:
    """A zsRE locality prompt as the question it is: ``"nq question: who ..."`` -> ``"who ..."``."""
    stripped = text.strip()
    if stripped.lower().startswith(_NQ_PREFIX):
        stripped = stripped[len(_NQ_PREFIX):].strip()
    return stripped or text


def _map_zsre(rec: dict) -> Tuple[dict, Dict[str, str]]:
    src_key, prompt = _get(rec, "src", "prompt", required=True)
    alt_key, alt = _get(rec, "alt", "target_new")
    ans_key, answers = _get(rec, "answers", "ground_truth")
    truth = _first_answer(ans_key, answers)
    if isinstance(alt, dict) and "str" in alt:
        alt = alt["str"]
    if alt is None:
        raise _FieldError("alt | target_new", "missing: the new target of the edit")
    # an empty alt is not an edit: falling back to the true answer would "edit" towards it
    target, target_key = _str(alt_key, alt), alt_key
    target_true = truth
    if target_true is None:
        target_true = _first_answer("pred", rec.get("pred"))
    reph_key, rephrase = _get(rec, "rephrase", "rephrase_prompt")
    loc_key, loc = _get(rec, "loc", "locality_prompt")
    la_key, loc_ans = _get(rec, "loc_ans", "locality_ground_truth")
    locality = []
    if loc is not None:
        locality.append(LocalityPrompt(_str(loc_key, loc), _first_answer(la_key, loc_ans)))
    portability = _easyedit_portability(rec.get("portability"))
    paraphrases = _str_list(reph_key, rephrase)
    prompt = _str(src_key, prompt)
    questions = {q: q for q in [prompt, *paraphrases]}
    questions.update({lp.prompt: _nq_question(lp.prompt) for lp in locality})
    kwargs = dict(prompt=prompt, target=_str(target_key, target),
                  target_true=target_true, paraphrases=paraphrases, questions=questions,
                  locality=locality, subject=rec.get("subject"), portability=portability,
                  extra=_extra(rec, (src_key, alt_key, ans_key, reph_key, loc_key, la_key,
                                     "subject", "portability")))
    return kwargs, {"prompt": src_key, "target": target_key, "target_true": ans_key,
                    "paraphrases": reph_key, "locality": loc_key, "subject": "subject",
                    "portability": "portability", "extra": "extra", "questions": src_key}


def _map_counterfact(rec: dict) -> Tuple[dict, Dict[str, str]]:
    _, rw = _get(rec, "requested_rewrite", required=True)
    if isinstance(rw, list):        # some MEMIT dumps keep a one-item list
        if len(rw) != 1:
            raise _FieldError("requested_rewrite", f"expected one rewrite, got {len(rw)}")
        rw = rw[0]
    if not isinstance(rw, dict):
        raise _FieldError("requested_rewrite", f"expected an object, got {type(rw).__name__}")

    def sub(key: str):
        if key not in rw or rw[key] is None:
            raise _FieldError(f"requested_rewrite.{key}", "missing")
        return rw[key]

    subject = _str("requested_rewrite.subject", sub("subject"))
    template = _str("requested_rewrite.prompt", sub("prompt"))
    if "{}" not in template:
        raise _FieldError("requested_rewrite.prompt", "expected a '{}' placeholder for the subject")
    new = _first_answer("requested_rewrite.target_new.str", sub("target_new"))
    if new is None:
        raise _FieldError("requested_rewrite.target_new.str", "missing or empty")
    true = _first_answer("requested_rewrite.target_true.str", rw.get("target_true"))
    neighbours = _str_list("neighborhood_prompts", rec.get("neighborhood_prompts"), False)
    kwargs = dict(prompt=template.replace("{}", subject), target=new, target_true=true,
                  subject=subject, relation=rw.get("relation_id"),
                  paraphrases=_str_list("paraphrase_prompts", rec.get("paraphrase_prompts"),
                                        False),
                  locality=[LocalityPrompt(p, true) for p in neighbours],
                  extra=_extra(rec, ("requested_rewrite", "paraphrase_prompts",
                                     "neighborhood_prompts")))
    return kwargs, {"prompt": "requested_rewrite.prompt",
                    "target": "requested_rewrite.target_new.str",
                    "target_true": "requested_rewrite.target_true.str",
                    "subject": "requested_rewrite.subject",
                    "relation": "requested_rewrite.relation_id",
                    "paraphrases": "paraphrase_prompts", "locality": "neighborhood_prompts",
                    "extra": "extra"}


_FLIP = {"SUPPORTS": "REFUTES", "REFUTES": "SUPPORTS", "True": "False", "False": "True",
         "true": "false", "false": "true", "yes": "no", "no": "yes", "Yes": "No", "No": "Yes"}


def _map_fever(rec: dict) -> Tuple[dict, Dict[str, str]]:
    p_key, prompt = _get(rec, "input", "claim", "src", "prompt", required=True)
    t_key, truth = _get(rec, "prediction", "label", "ground_truth")
    target_true = _first_answer(t_key, truth)
    if target_true is None and isinstance(rec.get("output"), list) and rec["output"]:
        out0 = rec["output"][0]
        if isinstance(out0, dict):
            t_key, target_true = "output[0].answer", _first_answer("output[0].answer",
                                                                   out0.get("answer"))
    a_key, alt = _get(rec, "alternatives", "alt", "target", "target_new")
    target = _first_answer(a_key, alt)
    if target is None:
        if target_true in _FLIP:
            target, a_key = _FLIP[target_true], t_key
        else:
            raise _FieldError("alternatives | alt | target",
                              "missing (and no SUPPORTS/REFUTES label to flip)")
    r_key, reph = _get(rec, "filtered_rephrases", "rephrases", "rephrase", "rephrase_prompt")
    loc_key, loc = _get(rec, "loc", "locality_prompt")
    la_key, loc_ans = _get(rec, "loc_ans", "locality_ground_truth")
    locality = ([LocalityPrompt(_str(loc_key, loc), _first_answer(la_key, loc_ans))]
                if loc is not None else [])
    kwargs = dict(prompt=_str(p_key, prompt), target=target, target_true=target_true,
                  paraphrases=_str_list(r_key, reph), locality=locality,
                  extra=_extra(rec, (p_key, t_key, a_key, r_key, loc_key, la_key)))
    return kwargs, {"prompt": p_key, "target": a_key, "target_true": t_key,
                    "paraphrases": r_key, "locality": loc_key, "extra": "extra"}


def _map_ultraeditbench(rec: dict) -> Tuple[dict, Dict[str, str]]:
    """The reference loader's layout (``ans``: the new target) or the zsre mapping's keys."""
    if "ans" not in rec or rec.keys() & {"alt", "target_new"}:
        return _map_zsre(rec)
    renamed = {("target_new" if k == "ans" else k): v for k, v in rec.items()}
    try:
        kwargs, sources = _map_zsre(renamed)
    except _FieldError as err:    # named as the file names it
        raise _FieldError("ans" if err.field == "target_new" else err.field, err.message) from None
    return kwargs, {k: ("ans" if v == "target_new" else v) for k, v in sources.items()}


def _map_wikibigedit(rec: dict) -> Tuple[dict, Dict[str, str]]:
    _, prompt = _get(rec, "update", required=True)
    _, target = _get(rec, "ans", required=True)
    paraphrases = _str_list("rephrase", rec.get("rephrase"))
    personas = _str_list("personas", rec.get("personas"))
    locality = []
    if rec.get("loc") is not None:
        locality.append(LocalityPrompt(_str("loc", rec["loc"]),
                                       _first_answer("loc_ans", rec.get("loc_ans"))))
    portability = []
    mhop, mhop_ans = rec.get("mhop"), _first_answer("mhop_ans", rec.get("mhop_ans"))
    if isinstance(mhop, str) and mhop.strip() and mhop_ans:
        portability.append((mhop, mhop_ans))
    elif mhop is not None and not isinstance(mhop, str):
        raise _FieldError("mhop", f"expected a string, got {type(mhop).__name__}")
    rel_key, relation = _get(rec, "relation", "tag")
    extra = _extra(rec, ("update", "ans", "rephrase", "personas", "loc", "loc_ans", "mhop",
                         "mhop_ans", "subject", rel_key))
    extra["personas"] = personas
    kwargs = dict(prompt=_str("update", prompt), target=_first_answer("ans", target) or "",
                  paraphrases=paraphrases, locality=locality, portability=portability,
                  subject=rec.get("subject"),
                  relation=relation if isinstance(relation, str) and relation.strip() else None,
                  extra=extra)
    return kwargs, {"prompt": "update", "target": "ans", "paraphrases": "rephrase",
                    "locality": "loc", "portability": "mhop", "subject": "subject",
                    "relation": rel_key, "extra": "extra"}


def _easyedit_pairs(key: str, value: Any) -> List[Tuple[str, Optional[str]]]:
    """EasyEdit locality/portability: {kind: [{prompt, ground_truth}] | {prompt, ground_truth}},
    a list of such dicts, or {"New Question", "New Answer"} (zsRE portability)."""
    if value is None:
        return []
    if isinstance(value, dict) and "New Question" in value:
        return [(_str(f"{key}.New Question", value["New Question"]),
                 _first_answer(f"{key}.New Answer", value.get("New Answer")))]
    if isinstance(value, dict) and "prompt" in value:
        value = [value]
    groups = value.items() if isinstance(value, dict) else [(None, value)]
    out = []
    for kind, items in groups:
        name = key if kind is None else f"{key}.{kind}"
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise _FieldError(name, f"expected a list of {{prompt, ground_truth}}, got "
                                    f"{type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "prompt" not in item:
                raise _FieldError(f"{name}[{i}]", "expected an object with 'prompt'")
            prompts = item["prompt"] if isinstance(item["prompt"], list) else [item["prompt"]]
            answer = _first_answer(f"{name}[{i}].ground_truth",
                                   item.get("ground_truth", item.get("answer")))
            for p in prompts:
                out.append((_str(f"{name}[{i}].prompt", p), answer))
    return out


def _easyedit_portability(value: Any) -> List[Tuple[str, str]]:
    return [(p, a) for p, a in _easyedit_pairs("portability", value) if a]


def _map_easyedit(rec: dict) -> Tuple[dict, Dict[str, str]]:
    _, prompt = _get(rec, "prompt", required=True)
    _, new = _get(rec, "target_new", required=True)
    target = _first_answer("target_new", new)
    if target is None:
        raise _FieldError("target_new", "empty")
    r_key, reph = _get(rec, "rephrase_prompt", "rephrase")
    locality = []
    if isinstance(rec.get("locality_prompt"), (str, list)):
        prompts = _str_list("locality_prompt", rec["locality_prompt"])
        answers = rec.get("locality_ground_truth")
        answers = answers if isinstance(answers, list) and len(answers) == len(prompts) \
            else [answers] * len(prompts)
        locality = [LocalityPrompt(p, _first_answer("locality_ground_truth", a))
                    for p, a in zip(prompts, answers)]
    elif rec.get("locality") is not None:
        locality = [LocalityPrompt(p, a) for p, a in _easyedit_pairs("locality", rec["locality"])]
    kwargs = dict(prompt=_str("prompt", prompt), target=target,
                  target_true=_first_answer("ground_truth", rec.get("ground_truth")),
                  paraphrases=_str_list(r_key, reph), locality=locality,
                  subject=rec.get("subject"),
                  portability=_easyedit_portability(rec.get("portability")),
                  extra=_extra(rec, ("prompt", "target_new", "ground_truth", r_key,
                                     "locality_prompt", "locality_ground_truth", "locality",
                                     "subject", "portability")))
    return kwargs, {"prompt": "prompt", "target": "target_new", "target_true": "ground_truth",
                    "paraphrases": r_key, "locality": "locality", "subject": "subject",
                    "portability": "portability", "extra": "extra"}


def _map_records(rec: dict) -> Tuple[dict, Dict[str, str]]:
    known = {"prompt", "target", "paraphrases", "locality", "subject", "relation",
             "target_true", "portability", "extra", "questions"}
    for key in rec:
        if key not in known:
            raise _FieldError(str(key), "unknown field")
    _get(rec, "prompt", required=True)
    _get(rec, "target", required=True)
    return dict(rec), {k: k for k in known}


FORMATS: Dict[str, Callable[[dict], Tuple[dict, Dict[str, str]]]] = {
    "zsre": _map_zsre,
    "counterfact": _map_counterfact,
    "fever": _map_fever,
    "wikibigedit": _map_wikibigedit,
    "ultraeditbench": _map_ultraeditbench,
    "easyedit": _map_easyedit,
    "records": _map_records,
}


def detect_format(record: dict) -> Optional[str]:
    """The format whose signature keys ``record`` has, or None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"update", "ans"} <= keys:
        return "wikibigedit"
    if "src" in keys and keys & {"alt", "answers"}:
        return "zsre"
    if keys & {"alternatives", "filtered_rephrases"} or ("claim" in keys and "label" in keys):
        return "fever"
    if {"prompt", "ans"} <= keys:
        return "ultraeditbench"
    if {"prompt", "target_new"} <= keys:
        loc = record.get("locality_prompt")
        if isinstance(loc, str) and loc.startswith("nq question:"):
            return "ultraeditbench"   # zsRE's locality under EasyEdit's names: the zsre mapping
        return "easyedit"
    if {"prompt", "target"} <= keys:
        return "records"
    return None


def _is_json_lines(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".ndjson"))


def read_raw(path: str) -> List[Any]:
    """The raw records of a ``.json`` (list, or object with a ``data``/``records`` list) or
    ``.jsonl`` file; DataFormatError naming the file (and line) when it cannot be parsed."""
    return _read_rows(path)[0]


def _read_rows(path: str) -> Tuple[List[Any], Optional[List[int]]]:
    """``(read_raw(path), each record's 1-based line)``; the lines are None for a ``.json``
    file, whose records are not one per line."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        raise DataFormatError(path, None, None, f"not UTF-8 text (byte {err.start}: "
                                                f"{err.reason}); a data file is JSON") from None
    if _is_json_lines(path):
        rows, lines = [], []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(path, None, None,
                                      f"line {line_no}: invalid JSON: {err.msg}") from None
            lines.append(line_no)
        return rows, lines
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, None, None, f"invalid JSON at line {err.lineno}: "
                                                f"{err.msg}") from None
    if isinstance(data, dict):
        for key in ("data", "records"):
            if isinstance(data.get(key), list):
                return data[key], None
        raise DataFormatError(path, None, None, "expected a list of records (or an object "
                                                "with a 'data' or 'records' list)")
    if not isinstance(data, list):
        raise DataFormatError(path, None, None, f"expected a list of records, got "
                                                f"{type(data).__name__}")
    return data, None


def _asked(kwargs: dict) -> Dict[str, str]:
    """The prompts of a mapped record that are questions already (they end with "?")."""
    prompts = [kwargs.get("prompt"), *kwargs.get("paraphrases", [])]
    prompts += [lp.prompt for lp in kwargs.get("locality", [])]
    prompts += [p for p, _ in kwargs.get("portability", [])]
    return {p: p for p in prompts if isinstance(p, str) and p.rstrip().endswith("?")}


def map_record(raw: Any, format: str, path: str = "<memory>", index: int = 0,
               line: Optional[int] = None) -> EditRecord:
    """Map one raw record with ``FORMATS[format]``; DataFormatError naming path/index/field
    (and ``line``, the record's line in a JSON Lines file, when given)."""
    if not isinstance(raw, dict):
        raise DataFormatError(path, index, None, f"expected an object, got {type(raw).__name__}",
                              line)
    sources: Dict[str, str] = {}
    try:
        kwargs, sources = FORMATS[format](raw)
        if format != "records":
            kwargs["questions"] = {**_asked(kwargs), **kwargs.get("questions", {})}
        return EditRecord(**kwargs)
    except _FieldError as err:
        raise DataFormatError(path, index, err.field, err.message, line) from None
    except RecordValidationError as err:
        root = err.field.split("[")[0].split(".")[0]
        field = sources.get(root, root)
        detail = str(err).split(": ", 1)[1]
        raise DataFormatError(path, index, field,
                              f"{detail} (EditRecord.{err.field})", line) from None


def load_records(path: str, format: str = "auto", limit: Optional[int] = None) -> List[EditRecord]:
    """Load a data file as :class:`EditRecord` objects.

    Args:
        path: a ``.json`` file, or a ``.jsonl``/``.ndjson`` file (one record per line).
        format: ``"auto"`` (detected from the first record's keys) or one of :data:`FORMATS`.
        limit: read at most this many records (from the start).

    Raises:
        DataFormatError: the file cannot be parsed, the format cannot be detected, or a record
            does not fit (the message names the file, record index and source field).
        FileNotFoundError: no such file.
    """
    return read_records(path, format, limit)[0]


def read_records(path: str, format: str = "auto",
                 limit: Optional[int] = None) -> Tuple[List[EditRecord], Optional[str]]:
    """``(load_records(path, format, limit), the format read)``: with ``"auto"`` the detected
    one (None for an empty file)."""
    path = os.fspath(path)
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose 'auto' or one of {sorted(FORMATS)}")
    raw, lines = _read_rows(path)
    if limit is not None:
        raw = raw[:limit]
    if format == "auto":
        if not raw:
            return [], None
        format = detect_format(raw[0])
        if format is None:
            keys = sorted(raw[0])[:12] if isinstance(raw[0], dict) else type(raw[0]).__name__
            raise DataFormatError(path, 0, None, f"cannot detect the format from keys {keys}; "
                                                 f"pass format= one of {sorted(FORMATS)}",
                                  lines[0] if lines else None)
    return [map_record(r, format, path, i, lines[i] if lines else None)
            for i, r in enumerate(raw)], format


def save_records(records: Sequence[EditRecord], path: str) -> None:
    """Write records as ``.jsonl`` (one ``EditRecord.to_dict()`` per line) or, for any other
    suffix, one ``.json`` list; ``load_records(path)`` reads them back (format ``records``)."""
    from ..temporary import atomic_write

    path = os.fspath(path)
    rows = [r.to_dict() for r in records]
    with atomic_write(path) as fh:   # a failed write leaves no half file (nor a truncated old one)
        if _is_json_lines(path):
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(rows, fh, ensure_ascii=False, indent=1)
