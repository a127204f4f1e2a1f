"""Prototype of the edit-quality ideas measured before they went into UltraEditor (experiments/tuning.md).

Same protocol as experiments/editor_tuning.py (tuning facts: 100 city -> country counterfactuals, seed
1; 2 lifelong turns of 50; teacher-forced ES/GS/LS), but the ideas are patched into a subclass
with float64 solves: ``pos`` (answer | subject | both capture positions), ``stop`` (held rows:
pseudo-value 0 for edits the model already predicts), ``nu`` (key memory of earlier turns),
``mu0`` (preservation of keys of self-generated generic text: ``(KᵀK + μ0·E[k kᵀ] + λI)⁻¹KᵀV``),
``ent`` (preserved subjects, as ``UltraEditor(preserve=)``: keys of country and city names in
``ent_ctx`` contexts, ``ent_cities`` cities; ``ent_excl=false`` keeps the edited subjects' rows),
``ridge``, ``layers``. Rows are appended to ``--out`` as JSON lines
(experiments/results/editor_prototype.jsonl holds the measured ones).

    python experiments/editor_prototype.py --cfg '{"lr":1e-4,"steps":3}' '{"lr":1e-4,"steps":3,"mu0":100}'
"""
import argparse, json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
import ultraedit.editor as E
from ultraedit.eval import demo_records
from _common import run_demo
from ultraedit.data.records import EditRecord
from ultraedit.models import load_model
from ultraedit_kernels import pseudo_values

OPEN = ["The history of the Roman Empire", "Photosynthesis is the process", "In football, the offside rule",
 "To bake a loaf of bread,", "The Python programming language", "My favourite holiday was",
 "The stock market fell sharply", "Quantum mechanics describes", "The novel begins with",
 "A healthy breakfast includes", "The river flows through", "Scientists have discovered a new",
 "The election results showed", "Once upon a time, there was", "The human heart pumps",
 "Climate change affects", "The museum opened a new exhibition", "In mathematics, a prime number",
 "The recipe calls for", "The company announced that", "During the Second World War,",
 "The best way to learn a language", "Mount Everest is", "The president said in a speech",
 "Electric cars are becoming", "The cat sat on the", "Music festivals in the summer",
 "The university offers courses in", "A black hole forms when", "The tennis player won",
 "Ancient Egyptians built", "The smartphone has changed", "Vaccines work by",
 "The train to the city", "He opened the door and", "The population of the town",
 "Shakespeare wrote many plays", "The weather forecast for tomorrow", "Coffee is grown in",
 "The painting was sold for", "Dolphins are known for", "The law requires that",
 "Artificial intelligence can", "The capital city is famous for its", "The river Nile",
 "Children learn to read", "The bridge was built in", "Olive oil is used"]

def generic_texts(model, tok, n_new=48, seed=0):
    torch.manual_seed(seed)
    out = []
    for p in OPEN:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            o = model.generate(ids, max_new_tokens=n_new, do_sample=True, top_p=0.9, temperature=1.0,
                               pad_token_id=tok.eos_token_id)
        out.append(o[0])
    return out

def capture_keys(model, mods, seqs):
    named = dict(model.named_modules())
    acc = {m: [] for m in mods}
    hs = [named[m].register_forward_hook(lambda mod, inp, out, m=m: acc[m].append(inp[0][0].detach().double()))
          for m in mods]
    with torch.no_grad():
        for s in seqs:
            model(s[None])
    for h in hs: h.remove()
    return {m: torch.cat(v) for m, v in acc.items()}

SUBJ = {}
class Proto(E.UltraEditor):
    pos = "answer"
    def _capture_mask(self, batch):
        lab = batch["labels"]; m = lab != -100
        if self.pos == "answer": return m
        out = torch.zeros_like(m)
        for b in range(lab.shape[0]):
            first = int(m[b].nonzero()[0])
            key = tuple(batch["input_ids"][b, :first + 1].tolist())
            out[b, SUBJ[key]] = True
        if self.pos == "both": out |= m
        return out
    C0 = {}
    mu0 = 0.0
    ent = 0.0          # weight of the entity-key preservation term
    EK = {}            # module -> (n_entities x contexts, d) float64 entity keys
    ENAMES = []        # entity name per row of EK
    turn_subjects = set()
    excl = True
    nu = 0.0
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cprev = {}
        self.pending = {}
    stop = False
    def _forward_loss(self, batch):
        import torch.nn.functional as F
        if getattr(self, "_fresh", True):
            self._rowdone = []; self._fresh = False
        labels = batch["labels"]
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        ans = labels != -100
        ok = (logits.argmax(-1) == labels) | ~ans
        done = ok.all(1)
        cm = self._capture_mask(batch)
        self._rowdone.append(done[:, None].expand_as(cm)[cm])
        return (F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100),
                done)
    def _module_update(self, name, k, g, st, hold=None):
        self._fresh = True
        if self.stop:
            done = torch.cat(self._rowdone)
            v = pseudo_values(k, g, st, lr=self.lr).double()
            v[done] = 0
            kd = k.double()
            if self.nu or self.mu0 or self.ent:
                self.pending[name] = kd
                M = kd.T @ kd + self.ridge * torch.eye(kd.shape[1], dtype=torch.float64)
                if self.nu and name in self.cprev: M += self.nu * self.cprev[name]
                if self.mu0: M += self.mu0 * self.C0[name]
                if self.ent:
                    if name not in self.pgram:
                        keep = torch.tensor([n not in self.turn_subjects for n in self.ENAMES])
                        ek = self.EK[name][keep]
                        self.pgram[name] = ek.T @ ek
                    M += self.ent * self.pgram[name]
                return ("primal", torch.linalg.solve(M, kd.T @ v).float()), k
            A = torch.linalg.solve(kd @ kd.T + self.ridge * torch.eye(kd.shape[0], dtype=torch.float64), v)
            return ("dual", A.float()), k
        if self.mu0 == 0 and self.nu == 0:
            return super()._module_update(name, k, g, st, None)
        v = pseudo_values(k, g, st, lr=self.lr).double()
        kd = k.double()
        d = kd.shape[1]
        A = kd.T @ kd + self.ridge * torch.eye(d, dtype=torch.float64)
        if self.mu0: A += self.mu0 * self.C0[name]
        if self.nu and name in self.cprev: A += self.nu * self.cprev[name]
        dw = torch.linalg.solve(A, kd.T @ v)
        self.pending[name] = kd
        return ("primal", dw.float()), k
    def edit(self, reqs):
        self.pgram = {}
        type(self).turn_subjects = set() if not self.excl else {q.subject if hasattr(q, "subject") else q["subject"] for q in reqs}
        r = super().edit(reqs)
        for n, kd in self.pending.items():
            self.cprev[n] = self.cprev.get(n, 0) + kd.T @ kd
        self.pending = {}
        return r

def down(a, b):
    return [f"model.layers.{i}.mlp.down_proj" for i in range(a, b + 1)]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", nargs="+", required=True, help="json dicts")
    ap.add_argument("--out", default="out/editor_prototype.jsonl")
    ap.add_argument("--cache", default="out/editor_prototype", help="facts and generic text cache")
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--ept", type=int, default=50)
    ap.add_argument("--facts-file", default=None,
                    help="records JSON (e.g. experiments/editor_tuning.py --facts-cache) instead of the "
                         "city -> country tuning facts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model()
    os.makedirs(args.cache, exist_ok=True)
    fc = os.path.join(args.cache, "facts.json")
    n = args.turns * args.ept
    if args.facts_file:
        records = [EditRecord.from_dict(d) for d in json.load(open(args.facts_file))]
    elif os.path.exists(fc):
        records = [EditRecord.from_dict(d) for d in json.load(open(fc))]
    else:
        records = demo_records(model, tok, 200, relations=("city_country",), seed=1)
        json.dump([r.to_dict() for r in records], open(fc, "w"))
    records = records[:n]
    from ultraedit.tokenization import encode_request
    for r in records:
        p_ids, _ = encode_request(tok, r.prompt, r.target)
        end = r.prompt.rfind(r.subject) + len(r.subject)
        assert end >= len(r.subject), (r.prompt, r.subject)
        pre, _ = encode_request(tok, r.prompt[:end], "x")
        SUBJ[tuple(p_ids)] = len(pre) - 1
    gc = os.path.join(args.cache, "generic.pt")
    if os.path.exists(gc):
        seqs = torch.load(gc)
    else:
        seqs = generic_texts(model, tok); torch.save(seqs, gc)
    named = dict(model.named_modules())
    allm = down(0, 29)
    orig = {m: named[m].weight.detach().clone() for m in allm}
    K0 = capture_keys(model, allm, seqs)
    from ultraedit.data.offline import country_table, city_table, _in_sentence
    from ultraedit.tokenization import subject_token_index

    def entity_keys(mods, ctxs, n_cities):
        names = [r["name"] for r in country_table()] + [c["name"] for c in city_table()[:n_cities]]
        texts, idx, owners = [], [], []
        for nm in names:
            for c in ctxs:
                t = c.format(s=_in_sentence(nm))
                t = t[:1].upper() + t[1:]
                texts.append(t); owners.append(nm)
                idx.append(subject_token_index(tok, t, nm if nm in t else nm.split(' ', 1)[1]))
        acc = {m: [] for m in mods}
        hs = [named[m].register_forward_hook(lambda mod, inp, out, m=m: acc[m].append(inp[0].detach().double()))
              for m in mods]
        from ultraedit.tokenization import encode_request
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = [encode_request(tok, t, "x")[0] for t in texts]
        with torch.no_grad():
            for s0 in range(0, len(rows), 64):
                chunk = rows[s0:s0 + 64]
                w = max(map(len, chunk))
                ids = torch.full((len(chunk), w), pad); att = torch.zeros((len(chunk), w), dtype=torch.long)
                for b, r in enumerate(chunk):
                    ids[b, :len(r)] = torch.tensor(r); att[b, :len(r)] = 1
                model(input_ids=ids, attention_mask=att)
                pos = torch.tensor(idx[s0:s0 + 64])
                for m in mods: acc[m][-1] = acc[m][-1][torch.arange(len(chunk)), pos]
        for h in hs: h.remove()
        return {m: torch.cat(v) for m, v in acc.items()}, owners
    EKC = {}
    for c in args.cfg:
        cfg = json.loads(c)
        with torch.no_grad():
            for m, w in orig.items(): named[m].weight.copy_(w)
        mods = down(*cfg.pop("layers", [24, 28]))
        Proto.pos = cfg.pop("pos", "answer")
        Proto.stop = cfg.pop("stop", False)
        Proto.mu0 = cfg.pop("mu0", 0.0); Proto.nu = cfg.pop("nu", 0.0)
        Proto.C0 = {m: K0[m].T @ K0[m] / K0[m].shape[0] for m in mods}
        Proto.ent = cfg.pop("ent", 0.0)
        Proto.excl = cfg.pop("ent_excl", True)
        ctxs = tuple(cfg.pop("ent_ctx", ["{s}", "I read a long article about {s}"]))
        ncity = cfg.pop("ent_cities", 1000)
        if Proto.ent:
            key = (tuple(mods), ctxs, ncity)
            if key not in EKC:
                t0 = time.time(); EKC[key] = entity_keys(mods, ctxs, ncity)
                print(f"entity keys {EKC[key][0][mods[0]].shape} in {time.time()-t0:.0f}s", file=sys.stderr)
            Proto.EK, Proto.ENAMES = EKC[key]
        E.UltraEditor = Proto
        t = time.time()
        res = run_demo(model, tok, records, turns=args.turns, edits_per_turn=args.ept,
                       editor_kwargs={"modules": mods, "positions": "answer", "hold_done": False,
                                      "memory": 0.0, "protect_mean": 0.0, "preserve": 0.0, **cfg}, progress=False, evaluate_before=False)
        a = res["metrics"]["after"]
        row = {"cfg": c, **a, "wall": time.time() - t, "ovh": res["timing"]["editor_overhead"]}
        print(json.dumps(row), flush=True)
        open(args.out, "a").write(json.dumps(row) + "\n")

main()
