"""Preserved subjects: keys of named entities whose outputs an edit turn must keep.

With ``UltraEditor(preserve=μ)`` every edited module gets, once, the keys ``K_p`` of a list of
subjects (entity names: by default entities the unedited model names itself when it continues
generic prompts, :func:`mined_subjects`, none of them a country or city of the offline tables
that evaluated edits come from; ``":tables"``: those tables' countries and populous cities),
captured from the UNEDITED model at the last token of each subject in a few neutral contexts
(:data:`DEFAULT_CONTEXTS`), and every solve becomes

    ΔW = argmin ||K ΔW - V||² + ν Σ_t ||K_t ΔW||² + μ ||K_p' ΔW||² + λ||ΔW||²
       = (KᵀK + νM + μ K_p'ᵀK_p' + λI)⁻¹ KᵀV

where ``K_p'`` leaves out the rows of the subjects this turn edits (their outputs are supposed
to change; ``EditRequest.subject`` is matched by exact string). Keys at a subject's last token
in early and middle layers are mostly the subject's own representation, so an edit of one
entity then leaves the module's output on other entities' keys, whatever prompt they appear
in, nearly unchanged: the neighbourhood locality that the paper's subject-free update loses
(docs/editor.md, "Preserved subjects"). This is the preservation term of MEMIT/AlphaEdit-style
editors, restricted to entity keys instead of a covariance of generic text (which was measured
to slide along the old efficacy/locality curve instead of moving it).

Cost: one forward of the unedited model over ``len(subjects) x len(contexts)`` short texts,
cut after the deepest edited module, at construction (``UltraEditor.preserve_s``; none when
read from the on-disk cache, ``UltraEditor.preserve_cached``); per edited
module an ``n x d_in`` float32 key matrix and its ``d_in x d_in`` float64 Gram; per turn one
``d_in x d_in`` Cholesky that the key memory's factor shares (``ultraedit.solver.Prior``).

Equivalent PyTorch for one module (``keys`` = the preserved rows not edited this turn)::

    dW = torch.linalg.solve(K.T @ K + nu * M + mu * keys.T @ keys + ridge * I, K.T @ V)
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["DEFAULT_CONTEXTS", "DEFAULT_CITIES", "PreservedKeys", "default_subjects",
           "resolve_subjects", "mine_subjects", "mined_subjects", "extract_spans",
           "GENERIC_PROMPTS", "TABLES", "GENERIC", "SOURCES", "DEFAULT_SOURCE",
           "capture_subject_keys", "capture_preserved", "encode_subject_texts",
           "preserved_cache_dir", "preserved_cache_key", "CACHE_ENV", "announce_capture"]

# Neutral left contexts: a subject's key depends only on the tokens up to it, so these differ
# from any relation's prompt ("The capital of {s}") while keeping the subject's representation.
DEFAULT_CONTEXTS = ("{s}", "I read a long article about {s}")
# Cities of the default subject list, most populous first (with every country).
DEFAULT_CITIES = 1000
_BATCH = 64  # texts per capture forward


class PreservedKeys:
    """One module's preserved keys: ``keys`` (n x d_in, float32), ``owners`` (the subject of each
    row) and ``gram = keysᵀkeys`` (d_in x d_in, float64)."""

    def __init__(self, keys: torch.Tensor, owners: Sequence[str],
                 gram: Optional[torch.Tensor] = None):
        """``gram``: ``keysᵀkeys`` as computed before (the cache stores it), else computed."""
        if keys.dim() != 2 or keys.shape[0] != len(owners):
            raise ValueError(f"keys must be len(owners) x d_in = {len(owners)} x d_in, "
                             f"got {tuple(keys.shape)}")
        if not bool(torch.isfinite(keys).all()):
            raise FloatingPointError("preserved keys hold NaN/Inf values")
        self.keys = keys.detach().to(torch.float32).contiguous()
        self.owners = list(owners)
        d = self.keys.shape[1]
        if gram is not None and (tuple(gram.shape) != (d, d) or gram.dtype != torch.float64
                                 or not bool(torch.isfinite(gram).all())):
            raise ValueError(f"a preserved-key Gram must be a finite {d} x {d} float64 matrix")
        if gram is None:
            k = self.keys.to(torch.float64)
            gram = k.T @ k
        self.gram = gram.to(self.keys.device)
        self._rows: Dict[str, List[int]] = {}
        for i, owner in enumerate(self.owners):
            self._rows.setdefault(owner, []).append(i)

    def gram_without(self, subjects: Iterable[str]) -> torch.Tensor:
        """``Σ kkᵀ`` over the rows whose owner is not in ``subjects`` (a new tensor)."""
        rows = [i for s in set(subjects) for i in self._rows.get(s, ())]
        if not rows:
            return self.gram.clone()
        k = self.keys[rows].to(torch.float64)
        return self.gram - k.T @ k

    def state_dict(self) -> Dict[str, object]:
        """``{"keys": n x d_in float32, "owners": [subject of each row]}``."""
        return {"keys": self.keys, "owners": list(self.owners)}

    @classmethod
    def from_state_dict(cls, sd: Dict[str, object], device=None) -> "PreservedKeys":
        """The inverse of :meth:`state_dict` (checks shapes and finiteness)."""
        keys = sd["keys"] if device is None else sd["keys"].to(device)
        return cls(keys, sd["owners"])

    def __repr__(self) -> str:
        return (f"PreservedKeys(rows={self.keys.shape[0]}, subjects={len(self._rows)}, "
                f"dim={self.keys.shape[1]})")


def default_subjects(n_cities: int = DEFAULT_CITIES) -> List[str]:
    """Every country of the offline tables, then its ``n_cities`` most populous cities
    (``ultraedit.data.offline``): real entities a small model is likely to know."""
    from .data.offline import city_table, country_table

    names = [r["name"] for r in country_table()]
    names += [c["name"] for c in city_table()[:n_cities]]
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------- subject sources
TABLES = ":tables"
GENERIC = ":generic"
SOURCES = (TABLES, GENERIC)
DEFAULT_SOURCE = GENERIC

# Generic prompts whose greedy continuations by the unedited model name entities
# (mine_subjects). None asks for a country, a city, a capital, a language or a currency: the
# preserved subjects should be entities the model knows, not the evaluated facts' domain.
GENERIC_PROMPTS = (
    "My favourite writer is", "My favourite painter is", "My favourite composer is",
    "My favourite actor is", "My favourite singer is", "My favourite band is",
    "My favourite football club is", "My favourite basketball player is",
    "My favourite scientist is", "My favourite philosopher is", "My favourite poet is",
    "My favourite film director is", "My favourite novel is", "My favourite film is",
    "My favourite video game is", "My favourite car brand is", "My favourite TV show is",
    "My favourite superhero is", "My favourite cartoon character is",
    "The company was founded by", "The theory of relativity was developed by",
    "The first person to walk on the Moon was", "The telephone was invented by",
    "The most famous play by William Shakespeare is", "The lead singer of the band is",
    "The richest person in the world is", "The most popular search engine is",
    "The largest software company is", "The best-selling smartphone is made by",
    "The largest online retailer is", "The most famous painting in the world is",
    "The greatest tennis player of all time is", "The fastest man in the world is",
    "The inventor of the light bulb was", "The author of the Harry Potter books is",
    "A famous Renaissance artist was", "A famous Greek philosopher was",
    "A famous Roman emperor was", "A famous classical composer is",
    "A famous physicist of the twentieth century was", "A well-known fashion brand is",
    "A well-known soft drink brand is", "A popular social network is",
    "A famous fictional detective is", "A popular children's book is",
    "The most famous university in the world is", "The biggest car manufacturer is",
    "The most famous rock band of all time is", "The most famous Disney film is",
    "The most famous opera was written by", "The discoverer of penicillin was",
    "The founder of the computer company was", "The famous novel was written by",
    "The chess world champion is", "The winner of the Nobel Prize in Literature was",
    "The most famous ballet was composed by", "The first emperor of the dynasty was",
    "In the story, the hero meets", "The main character of the book is",
    "The most famous queen in history is", "The most famous king in history is",
    "The spacecraft was built by", "The most popular programming language is",
    "The space agency that landed on Mars is", "The most famous brand of sneakers is",
    "The most famous magazine is", "The newspaper was founded by",
    "The album was recorded by", "The symphony was composed by",
    "The statue was sculpted by", "The movie starred", "The song was performed by",
    "The theory of evolution was proposed by", "The first computer programmer was",
    "My best friend's name is", "Our new teacher is called", "The detective in the novel is",
    "The villain of the film is", "The goalkeeper of the team is", "The coach of the team is",
    "The CEO of the company is", "The most famous jazz musician was",
    "The most famous hip hop artist is", "The most famous pop star is",
    "The most famous fashion designer is", "The most famous chef is",
    "The most famous architect was", "The most famous mathematician was",
    "The most famous astronaut was", "The most famous boxer was",
    "The most famous golfer is", "The most famous Formula One driver is",
    "The most famous cyclist is", "The most famous comedian is",
    "The most famous magician is", "The most famous explorer was",
    "The most famous pirate was", "The most famous general was",
    "The most famous cartoon is", "The most famous comic book is",
    "The most famous fairy tale is", "The most famous myth is about",
    "The most famous god in Greek mythology is", "The most famous robot in fiction is",
    "The most famous wizard in fiction is", "The most famous video game character is",
    "The most famous toy brand is", "The most famous luxury watch brand is",
    "The most famous airline is", "The most famous hotel chain is",
    "The most famous fast food chain is", "The most famous coffee chain is",
    "The most famous bank is", "The most famous record label is",
    "The most famous streaming service is", "The most famous board game is",
    "The most famous sports brand is", "The most famous electric car company is",
    "The most famous operating system is", "The most famous web browser is",
    "The most famous encyclopedia is", "The most famous prize in science is",
)
_SPAN_CONNECTORS = ("of", "the", "de", "von", "van", "da", "del", "la", "le")
_SPAN_STOP = frozenset("""
a an the i he she it we you they his her its our their my your this that these those there
here in on at by for from to with as of and or but so if when while after before since
because although however yes no not also then thus hence today yesterday tomorrow mr mrs ms
dr st one two three first second some many most every each all both other another such
what who whom whose which where why how is was are were be been being do does did have has
had can could will would shall should may might must january february march april may june
july august september october november december monday tuesday wednesday thursday friday
saturday sunday english god therefore i'm i've i'll i'd he's she's it's we're you're
they're what's that's there's let's here's who's""".split())
MINED_TOKENS = 32    # new tokens per generic prompt
MINED_MAX = 400      # at most this many mined subjects
MINED_ROUNDS = 2     # the second continues "<name> is" for the first round's names


def resolve_subjects(spec, model=None, tokenizer=None) -> List[str]:
    """The preserved subject names of ``EditConfig.preserve_subjects``: None is
    :data:`DEFAULT_SOURCE`; a list holds names and sources, each source expanded in place:
    ``":generic"`` (:func:`mine_subjects`: entities named by the unedited model itself, cached
    per model) and ``":tables"`` (:func:`default_subjects`: the offline tables' countries and
    cities, the evaluated facts' own domain). Duplicates are dropped, first occurrence kept."""
    items = [DEFAULT_SOURCE] if spec is None else list(spec)
    out: List[str] = []
    for item in items:
        if item == TABLES:
            out += default_subjects()
        elif item == GENERIC:
            if model is None or tokenizer is None:
                raise ValueError(f"{GENERIC!r} subjects are mined from a model: give the model "
                                 f"and its tokenizer")
            out += mined_subjects(model, tokenizer)
        elif isinstance(item, str) and item.startswith(":") and item not in SOURCES:
            raise ValueError(f"unknown preserved-subject source {item!r}; the sources are "
                             f"{list(SOURCES)} (other names are subjects)")
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def extract_spans(text: str) -> List[str]:
    """Entity-like spans of ``text``: maximal runs of capitalized words (``"of"``, ``"the"``,
    ``"de"``, ... allowed between them), without leading function words, in order."""
    import re

    tokens = re.findall(r"(?:[A-Z]\.)+|[A-Za-z0-9][\w'’&.-]*\w|\w|[^\s\w]", text)
    spans, run = [], []

    def close():
        while run and run[-1].lower() in _SPAN_CONNECTORS:
            run.pop()
        while run and (run[0].lower() in _SPAN_STOP or run[0].lower() in _SPAN_CONNECTORS):
            run.pop(0)
        if run and len(run) <= 5 and len({w.lower() for w in run}) == len(run):
            span = " ".join(run)
            if len(span) >= 3 and (any(c.islower() for c in span) or len(run) == 1):
                spans.append(span)
        run.clear()

    for tok in tokens:
        if tok[-2:] in ("'s", "’s") and tok.lower() not in _SPAN_STOP:
            tok = tok[:-2]  # a possessive: the name itself
        if tok[:1].isupper() and any(c.isalpha() for c in tok):
            run.append(tok)
        elif run and tok.lower() in _SPAN_CONNECTORS:
            run.append(tok)
        else:
            close()
    close()
    return spans


def _table_words() -> Tuple[set, set]:
    """Lower-cased ``(country-level names and values, city names)`` of the offline tables."""
    from .data.offline import city_table, country_table

    names = set()
    for row in country_table():
        for k in ("name", "capital", "currency", "language", "continent", "region"):
            if row.get(k):
                names.add(str(row[k]).lower())
    return names, {row["name"].lower() for row in city_table()}


def mine_subjects(model, tokenizer, prompts: Sequence[str] = GENERIC_PROMPTS,
                  max_new_tokens: int = MINED_TOKENS, limit: int = MINED_MAX,
                  rounds: int = MINED_ROUNDS, exclude_tables: bool = True) -> List[str]:
    """Entity names from the model's own greedy continuations of ``prompts``: the spans of
    :func:`extract_spans` in each continuation (the prompt's own words are not mined), in
    prompt order, without duplicates and (``exclude_tables``) without any span that is a city of
    the offline tables or holds one of their countries, capitals, languages, currencies,
    continents or regions as whole words (so the preserved subjects are not the evaluated
    facts' entities). Each further round continues ``"<name> is"`` for the
    names the previous round found. At most ``limit`` names."""
    from .eval.probing import greedy_continuations
    from .tokenization import encode_request, special_prefix

    prefix = special_prefix(tokenizer)
    table = _table_words() if exclude_tables else None
    out: Dict[str, None] = {}
    new: List[str] = []
    for r in range(rounds):
        if r:
            prompts = [f"{name} is" for name in new]
        if not prompts or len(out) >= limit:
            break
        ids = [encode_request(tokenizer, p, "x", prefix)[0] for p in prompts]
        new = []
        for g in greedy_continuations(model, tokenizer, ids, max_new_tokens):
            for span in extract_spans(tokenizer.decode(g, skip_special_tokens=True)):
                if span not in out and not _holds_table_name(span, table):
                    out[span] = None
                    new.append(span)
    return list(out)[:limit]


def _holds_table_name(span: str, table) -> bool:
    """``span`` is a city of the tables, or holds a country, capital, language, currency,
    continent or region of them as whole words."""
    import re

    if not table:
        return False
    countries, cities = table
    parts = re.findall(r"[\w'’&.-]+", span.lower())
    return " ".join(parts) in cities or any(
        " ".join(parts[i:j]) in countries
        for i in range(len(parts)) for j in range(i + 1, len(parts) + 1))


# Mined names shipped with the package (``presets/mined/mined-<digest>.json``): the entries the
# on-disk cache would hold, for models whose names were mined once before release (the
# embedded model), so that a first use does not spend minutes decoding the prompts.
SHIPPED_MINED_DIR = Path(__file__).parent / "presets" / "mined"


def _read_mined(path: Path) -> Optional[List[str]]:
    import json

    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names):
        return names
    return None


def mined_subjects(model, tokenizer) -> List[str]:
    """:func:`mine_subjects` with its defaults, read from the names shipped with the package
    (:data:`SHIPPED_MINED_DIR`) or the on-disk cache (:func:`preserved_cache_dir`), both
    ``mined-<digest>.json``, when the same model weights, tokenizer, prompts and settings were
    mined before."""
    from .placement import PlacementError

    name = None
    try:
        head = {"kind": "mined", "prompts": list(GENERIC_PROMPTS), "tokens": MINED_TOKENS,
                "limit": MINED_MAX, "rounds": MINED_ROUNDS, "stop": sorted(_SPAN_STOP),
                "connectors": list(_SPAN_CONNECTORS)}
        name = f"mined-{_digest(model, tokenizer, head, list(GENERIC_PROMPTS))}.json"
    except PlacementError:
        pass
    folder = preserved_cache_dir()
    path = folder / name if folder is not None and name is not None else None
    for candidate in ([SHIPPED_MINED_DIR / name] if name is not None else []) + [path]:
        if candidate is not None and candidate.is_file():
            names = _read_mined(candidate)
            if names is not None:
                return names
    names = mine_subjects(model, tokenizer)
    if not names:
        raise ValueError("the model's continuations of the generic prompts named no entity; "
                         "give preserve_subjects explicitly")
    if path is not None:
        from .serialization import write_json_atomic

        try:   # a temporary file of its own: two processes mining at once never mix theirs
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(names, path, indent=0)
        except OSError:
            pass
    return names


_ANNOUNCE: contextvars.ContextVar = contextvars.ContextVar("ultraedit_preserve_announce",
                                                          default=None)
_BARS: contextvars.ContextVar = contextvars.ContextVar("ultraedit_preserve_bars", default=True)


@contextlib.contextmanager
def announce_capture(callback, bars: bool = True):
    """Within the block, ``callback(n_subjects)`` is called when preserved keys are about to be
    captured from the model (seconds to minutes), not when they are read from the cache: a
    command line's "this takes a while" line. ``None`` announces nothing. ``bars=False``: no
    progress bar for a long capture either (a command line's ``--no-progress``)."""
    token, bars_token = _ANNOUNCE.set(callback), _BARS.set(bool(bars))
    try:
        yield
    finally:
        _BARS.reset(bars_token)
        _ANNOUNCE.reset(token)


def capture_preserved(editor, config) -> Tuple[Dict[str, "PreservedKeys"], float, bool]:
    """The preserved keys of ``editor``'s modules for ``config`` (its subjects and contexts,
    defaults where None), captured from the model as it is now, the seconds it took, and
    whether they were read from the cache.

    Read from the on-disk cache (:func:`preserved_cache_dir`) when an entry for the same model
    weights, modules, texts and tokenization exists; otherwise captured and stored there."""
    t0 = time.perf_counter()
    subjects = resolve_subjects(config.preserve_subjects, editor.model, editor.tokenizer)
    contexts = DEFAULT_CONTEXTS if config.preserve_contexts is None else config.preserve_contexts
    subjects = _check_texts(subjects, contexts)
    folder = preserved_cache_dir()
    digest = None
    if folder is not None:
        from .placement import PlacementError

        try:
            digest = preserved_cache_key(editor.model, editor.modules, editor.tokenizer,
                                         subjects, contexts)
        except PlacementError as exc:  # a weight the key cannot read: capture, do not cache
            import warnings
            warnings.warn(f"preserved keys are not cached for this model ({exc})", stacklevel=3)
            folder = None
    if folder is not None:
        owners = [s for s in subjects for _ in contexts]
        keys = _read_cached(folder / digest, editor.modules, owners)
        if keys is not None:
            return keys, time.perf_counter() - t0, True
    announce = _ANNOUNCE.get()
    if announce is not None:
        announce(len(subjects))
    rows, index, owners = encode_subject_texts(editor.tokenizer, subjects, contexts)
    keys = _capture_rows(editor.model, editor.tokenizer, editor.modules, rows, index, owners,
                         progress=len(subjects) > 256 and _BARS.get())
    if folder is not None:
        _write_cached(folder / digest, keys, owners)
    return keys, time.perf_counter() - t0, False


# ---------------------------------------------------------------------- the on-disk cache
CACHE_ENV = "ULTRAEDIT_PRESERVED_CACHE"
_CACHE_VERSION = 1
_CACHE_FILE = "preserve.safetensors"   # <module>: keys (n x d_in), <module>#gram: keysᵀkeys
_GRAM = "#gram"


def preserved_cache_dir():
    """Where preserved keys are cached: ``$ULTRAEDIT_PRESERVED_CACHE`` if set (``off``/``0``
    disables the cache), else ``$XDG_CACHE_HOME/ultraedit/preserved`` (``~/.cache/...``)."""
    import os
    from pathlib import Path

    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no", "none"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ultraedit" / "preserved"


def preserved_cache_key(model, modules: Dict[str, torch.nn.Module], tokenizer,
                        subjects: Sequence[str], contexts: Sequence[str]) -> str:
    """sha256 of everything a capture depends on: every parameter and buffer of the model (name,
    dtype, shape, bytes; offloaded ones as their hooks load them), the edited modules' names,
    the subjects and contexts, the tokenizer (a fast tokenizer's full serialization, else the
    token ids and subject positions of every text), the capture's batch size and the torch
    version."""
    head = {"version": _CACHE_VERSION, "batch_size": _BATCH, "modules": list(modules),
            "subjects": list(subjects), "contexts": list(contexts)}
    return _digest(model, tokenizer, head,
                   lambda: dict(zip(("rows", "index"),
                                    encode_subject_texts(tokenizer, subjects, contexts))))


def _digest(model, tokenizer, head: Dict[str, object], slow_tokenizer) -> str:
    """sha256 of ``head``, the model's class, the torch version, the tokenizer (a fast one's
    serialization, else ``slow_tokenizer()``: the token ids it gives the texts, or the texts
    when a list) and every parameter and buffer of the model."""
    import hashlib
    import json

    from .placement import tensor_values

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        from .tokenization import special_prefix

        tok = {"class": type(tokenizer).__name__, "backend": backend.to_str(),
               "prefix": special_prefix(tokenizer)}
    elif callable(slow_tokenizer):
        tok = slow_tokenizer()
    else:
        tok = [tokenizer(t)["input_ids"] for t in slow_tokenizer]
    head = {**head, "class": type(model).__name__, "torch": torch.__version__, "tokenizer": tok}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    tensors = list(model.named_parameters(remove_duplicate=False))
    tensors += list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        v = tensor_values(model, name, t).detach()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|{v.device.type};".encode())
        flat = v.contiguous().reshape(-1).cpu()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _read_cached(path, modules, owners) -> "Dict[str, PreservedKeys] | None":
    """The cached keys at ``path``, None if there are none; a corrupt or mismatched entry is
    reported with a warning and ignored."""
    import warnings

    from .serialization import StateError, read_dir

    if not path.exists():
        return None
    try:
        manifest, files = read_dir(path, expect_kind="preserved")
        keys = files[_CACHE_FILE]
        if manifest.get("owners") != list(owners) or set(keys) != (
                set(modules) | {f"{n}{_GRAM}" for n in modules}):
            raise StateError("its subjects or modules differ from this editor's")
        device = {n: _module_device(m) for n, m in modules.items()}
        return {n: PreservedKeys(keys[n].to(device[n]), owners, gram=keys[f"{n}{_GRAM}"])
                for n in modules}
    except (StateError, KeyError, ValueError, FloatingPointError) as exc:
        warnings.warn(f"ignoring the preserved-key cache entry {path} ({exc}); capturing them "
                      f"again", stacklevel=4)
        return None


def _write_cached(path, keys, owners) -> None:
    """Store ``keys`` under ``path``, safe against other processes caching the same entry at
    once: the entry is written in a folder of its own (``write_dir``'s siblings are unique to
    this writer) and renamed into place.  An entry another process installed meanwhile is kept
    (the same digest, the same keys); a corrupt one is replaced."""
    import shutil
    import tempfile
    import warnings
    from pathlib import Path

    from .serialization import write_dir

    tensors = {n: pk.keys for n, pk in keys.items()}
    tensors.update({f"{n}{_GRAM}": pk.gram for n, pk in keys.items()})
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        entry = staging / "entry"
        write_dir(entry, {_CACHE_FILE: tensors}, {"kind": "preserved", "owners": list(owners)})
        if path.exists() and not _valid_entry(path):
            try:   # a corrupt entry under our own cache key: moved aside, removed below
                path.rename(staging / "stale")
            except OSError:
                pass   # another process moved it first
        try:
            entry.rename(path)
        except OSError:
            if not _valid_entry(path):
                raise
            # another process installed the same entry first: keep theirs
    except (OSError, ValueError) as exc:
        warnings.warn(f"could not cache the preserved keys in {path} ({exc}); the next editor "
                      f"captures them again", stacklevel=4)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _valid_entry(path) -> bool:
    """``path`` is a complete cache entry (its manifest and files check out)."""
    from .serialization import StateError, read_dir

    try:
        read_dir(path, expect_kind="preserved")
    except (StateError, OSError, ValueError):
        return False
    return True


def _module_device(module) -> torch.device:
    from .placement import execution_device

    w = module.weight
    return w.device if w.device.type != "meta" else (execution_device(module)
                                                     or torch.device("cpu"))


class _StopForward(Exception):
    """Raised by the capture hook once every module has seen its input: the rest of the
    forward is not needed."""


def capture_subject_keys(model, tokenizer, modules: Dict[str, torch.nn.Module],
                         subjects: Sequence[str], contexts: Sequence[str] = DEFAULT_CONTEXTS,
                         batch_size: int = _BATCH, progress: bool = False) -> Dict[str, PreservedKeys]:
    """The input of each module at the last token of each subject in each context.

    Texts are ``context.format(s=subject)`` with the first letter capitalized, tokenized like an
    edit prompt (``encode_request``; BOS where the tokenizer adds one) and right-padded, so the
    subject's position is unaffected by padding. Returns ``{module name: PreservedKeys}`` with
    rows in subject-major order (``len(subjects) * len(contexts)`` rows).
    """
    rows, index, owners = encode_subject_texts(tokenizer, subjects, contexts)
    return _capture_rows(model, tokenizer, modules, rows, index, owners, batch_size, progress)


def encode_subject_texts(tokenizer, subjects: Sequence[str], contexts: Sequence[str]):
    """``(rows, index, owners)``: the token ids of every ``context.format(s=subject)`` (subject
    major), the subject's last-token index in each, and each row's subject."""
    from .tokenization import encode_request, special_prefix, subject_token_index

    subjects = _check_texts(subjects, contexts)
    prefix = special_prefix(tokenizer)
    rows, index, owners = [], [], []
    for s in subjects:
        for c in contexts:
            text = c.format(s=s)
            text = text[:1].upper() + text[1:]
            subject = s if s in text else s[:1].upper() + s[1:]
            rows.append(encode_request(tokenizer, text, "x", prefix)[0])
            index.append(subject_token_index(tokenizer, text, subject, prefix))
            owners.append(s)
    return rows, index, owners


def _check_texts(subjects, contexts) -> List[str]:
    subjects = list(subjects)
    if not subjects:
        raise ValueError("preserve_subjects is empty: give at least one subject name")
    for s in subjects:
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"preserve_subjects holds {s!r}; every subject must be a non-empty string")
    if isinstance(contexts, str) or not contexts:
        raise ValueError(f"preserve_contexts must be a non-empty list of texts with '{{s}}', "
                         f"got {contexts!r}")
    for c in contexts:
        if not isinstance(c, str) or "{s}" not in c:
            raise ValueError(f"preserve context {c!r} has no '{{s}}' for the subject")
    return subjects


def _capture_rows(model, tokenizer, modules, rows, index, owners, batch_size: int = _BATCH,
                  progress: bool = False) -> Dict[str, PreservedKeys]:
    from .tokenization import _pad_id

    pad = _pad_id(tokenizer)
    from .turn import input_device

    device = input_device(model)
    acc: Dict[str, List[torch.Tensor]] = {n: [] for n in modules}
    state = {"pos": None, "seen": set()}

    def hook(name):
        def pre(module, args):
            x = args[0]
            rows_ = torch.arange(x.shape[0], device=x.device)
            acc[name].append(x[rows_, state["pos"].to(x.device)].detach().float())
            state["seen"].add(name)
            if len(state["seen"]) == len(modules):
                raise _StopForward
        return pre

    from tqdm.auto import tqdm

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # similar lengths per batch: less padding to run through the layers
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
            starts = range(0, len(order), batch_size)
            for s0 in tqdm(starts, desc="preserved subject keys", unit="batch", disable=not progress):
                idx = order[s0:s0 + batch_size]
                width = max(len(rows[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                att = torch.zeros((len(idx), width), dtype=torch.long)
                for b, i in enumerate(idx):
                    ids[b, :len(rows[i])] = torch.tensor(rows[i])
                    att[b, :len(rows[i])] = 1
                state["pos"] = torch.tensor([index[i] for i in idx])
                state["seen"] = set()
                try:
                    model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False)
                except _StopForward:
                    pass
                missing = set(modules) - state["seen"]
                if missing:
                    raise RuntimeError(f"modules {sorted(missing)} were not called in the forward "
                                       f"pass; they cannot be edited")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return {n: PreservedKeys(torch.cat(v)[back.to(v[0].device)], owners) for n, v in acc.items()}
