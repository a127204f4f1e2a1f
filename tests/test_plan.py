"""ultraedit.plan: a turn's predicted peak memory against the allocator's measured peak (CPU).

The measured peak is the weights plus the highest running total of the CPU allocator's events
(``bench/memory.py``: the profiler's memory events, not RSS) over the editor's construction and
its turns (the steady state: rollback history filled). The prediction must be within 15% with
one backward per micro-batch, and an upper bound (at most 1.5x) when micro-batches share one.
"""
import importlib.util
import json
import os

import pytest
import torch

from conftest import ue_make_tokenizer
from ultraedit import UltraEditor
from ultraedit.plan import BUILTIN_CONFIGS, main, plan_turn, request_shape

# bench/memory.py, loaded from its path (the bench folder is not a package)
_spec = importlib.util.spec_from_file_location(
    "_bench_memory", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "bench", "memory.py"))
_bench_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_memory)
PeakMemory = _bench_memory.PeakMemory

PAPER = dict(lr=1e-6, positions="answer", steps=1, hold_done=False, memory=0.0, preserve=0.0,
             protect_mean=0.0)
SUBJECTS = ["France", "Germany", "Italy", "Spain", "Japan", "Peru"]
TARGETS = ["Paris", "Berlin", "Rome tower", "Madrid city", "Tokyo"]
PRESERVED = ["Paris", "Berlin", "Rome", "Madrid", "Tokyo", "Lima"]


def _requests(n):
    return [(f"The capital of {SUBJECTS[i % 6]} is", TARGETS[i % 5], SUBJECTS[i % 6])
            for i in range(n)]


def _model(dtype, hidden=256, inter=688, layers=6, vocab=300, attn="sdpa"):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(dtype).eval()


def _measure(model, tok, requests, turns, **kwargs):
    weights = sum(t.numel() * t.element_size()
                  for t in list(model.parameters()) + list(model.buffers()))
    with PeakMemory("cpu") as pm:
        editor = UltraEditor(model, tok, **{**PAPER, **kwargs})
        for _ in range(turns):
            report = editor.edit(requests)
    editor.last_backward_group = report.backward_group
    return weights + pm.peak_bytes, list(editor.modules), editor


CASES = {
    "fp32-two-modules": dict(dtype=torch.float32, edits=40, micro_batch=10,
                             modules=["model.layers.2.mlp.gate_proj", "model.layers.4.mlp.up_proj"]),
    "bf16-accumulate": dict(dtype=torch.bfloat16, edits=40, micro_batch=10,
                            modules=["model.layers.2.mlp.gate_proj", "model.layers.4.mlp.up_proj"]),
    "fp32-history3-mb20": dict(dtype=torch.float32, edits=40, micro_batch=20, history=3, turns=4,
                               modules=["model.layers.1.mlp.down_proj"]),
    "fp32-eager-attention": dict(dtype=torch.float32, edits=30, micro_batch=10, attn="eager",
                                 modules=["model.layers.1.self_attn.q_proj"]),
    "fp32-key-memory": dict(dtype=torch.float32, edits=20, micro_batch=10, memory=1.0, hidden=128,
                            inter=344, layers=4, turns=3, modules=["model.layers.1.mlp.down_proj"]),
    # N = 224 rows > d_in = 64: the dense primal ΔW
    "fp32-primal": dict(dtype=torch.float32, edits=40, micro_batch=10, hidden=64, inter=172,
                        layers=4, modules=["model.layers.1.mlp.gate_proj"]),
    # the options beyond the paper: keys at the subject, key memory, preserved subjects, steps
    "fp32-subject-memory-preserve": dict(dtype=torch.float32, edits=30, micro_batch=10, turns=3,
                                         positions="subject", memory=1.0, preserve=0.3,
                                         modules=["model.layers.1.mlp.down_proj",
                                                  "model.layers.2.mlp.down_proj"]),
    "fp32-three-steps": dict(dtype=torch.float32, edits=30, micro_batch=10, turns=3, steps=3,
                             positions="subject", memory=1.0, preserve=0.3,
                             modules=["model.layers.1.mlp.down_proj",
                                      "model.layers.2.mlp.down_proj"]),
    # whitened value gradients: a 344 x 344 covariance kept, an eigh in every solve
    "fp32-whiten": dict(dtype=torch.float32, edits=30, micro_batch=10, turns=3, whiten=1e-3,
                        hidden=128, inter=344, layers=4, modules=["model.layers.1.mlp.up_proj"]),
    # the turn's products in bfloat16: bfloat16 copies of every frozen linear weight
    "fp32-matmul-bfloat16": dict(dtype=torch.float32, edits=30, micro_batch=10, turns=2,
                                 matmul_dtype="bfloat16", modules=["model.layers.1.mlp.down_proj"]),
    "bf16-large-vocab-no-history": dict(dtype=torch.bfloat16, edits=40, micro_batch=10, history=0,
                                        vocab=2000, modules=["model.layers.0.mlp.up_proj"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prediction_within_15_percent_of_measured_peak(case, ue_tokenizer):
    c = dict(CASES[case])
    dtype, turns = c.pop("dtype"), c.pop("turns", 2)
    attn = c.pop("attn", "sdpa")
    shape = {k: c.pop(k) for k in ("hidden", "inter", "layers", "vocab") if k in c}
    torch.set_num_threads(1)
    model = _model(dtype, attn=attn, **shape)
    requests = _requests(c["edits"])
    options = {k: c[k] for k in ("positions", "memory", "preserve", "steps", "whiten",
                                 "matmul_dtype") if k in c}
    extra = dict(options, lr=1e-4, preserve_subjects=PRESERVED) if options else {}
    measured, modules, editor = _measure(model, ue_tokenizer, requests, turns,
                                         modules=c["modules"], micro_batch=c["micro_batch"],
                                         history=c.get("history", 1), backward_group=1, **extra)
    rows = max((len(p.owners) for p in editor.preserved.values()), default=0)
    plan = plan_turn(model, dtype, modules, edits=c["edits"], micro_batch=c["micro_batch"],
                     history=c.get("history", 1), attn_implementation=attn,
                     preserved_rows=rows, **options,
                     **request_shape(ue_tokenizer, requests, c["micro_batch"]))
    ratio = plan.total_bytes / measured
    print(f"{case}: predicted {plan.total_bytes / 2**20:.2f} MiB, measured "
          f"{measured / 2**20:.2f} MiB, ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15, (case, ratio, plan.format())


@pytest.mark.parametrize("case", ["fp32-two-modules", "bf16-accumulate", "fp32-primal",
                                  "fp32-three-steps"])
def test_a_shared_backward_is_bounded_from_above(case, ue_tokenizer):
    """Micro-batches sharing one backward (``backward_group``, here all 3-4 of the turn): the
    plan counts every one's activations as a whole micro-batch's peak, an upper bound (a forward's
    transient tensors are freed before the next one starts), never more than 1.5x."""
    c = dict(CASES[case])
    dtype, turns = c.pop("dtype"), c.pop("turns", 2)
    shape = {k: c.pop(k) for k in ("hidden", "inter", "layers", "vocab") if k in c}
    torch.set_num_threads(1)
    model = _model(dtype, **shape)
    requests = _requests(c["edits"])
    options = {k: c[k] for k in ("positions", "memory", "preserve", "steps") if k in c}
    extra = dict(options, lr=1e-4, preserve_subjects=PRESERVED) if options else {}
    measured, modules, editor = _measure(model, ue_tokenizer, requests, turns,
                                         modules=c["modules"], micro_batch=c["micro_batch"],
                                         backward_group="auto", **extra)
    group = editor.last_backward_group
    assert group == -(-c["edits"] // c["micro_batch"]) > 1
    rows = max((len(p.owners) for p in editor.preserved.values()), default=0)
    plan = plan_turn(model, dtype, modules, edits=c["edits"], micro_batch=c["micro_batch"],
                     preserved_rows=rows, backward_group=group, **options,
                     **request_shape(ue_tokenizer, requests, c["micro_batch"]))
    assert 1.0 <= plan.total_bytes / measured <= 1.5, (case, plan.total_bytes / measured)


@pytest.mark.embedded
def test_embedded_model_prediction(ue_embedded, ue_restore):
    from ultraedit.modules import paper_module_names

    model, tok = ue_embedded
    requests = [(f"The capital of {s} is", t) for s, t in zip(SUBJECTS, TARGETS)] * 2
    modules = paper_module_names(model)
    ue_restore(model, modules)
    measured, _, _ = _measure(model, tok, requests, 2, modules=modules, micro_batch=10, history=1,
                              backward_group=1)
    plan = plan_turn(model, "fp32", modules, edits=len(requests), micro_batch=10,
                     **request_shape(tok, requests, 10))
    print(f"embedded: predicted {plan.total_bytes / 2**20:.1f} MiB, measured "
          f"{measured / 2**20:.1f} MiB, ratio {plan.total_bytes / measured:.3f}")
    assert 0.85 <= plan.total_bytes / measured <= 1.15, plan.format()


def test_builtin_configs_and_cli(capsys, tmp_path):
    assert {"mistral-7b", "llama-3-8b", "smollm2-135m"} <= set(BUILTIN_CONFIGS)
    rc = main(["--config", "mistral-7b", "--dtype", "bf16", "--edits", "100"])
    out = capsys.readouterr().out
    assert rc == 0 and "fits in 24 GiB" in out
    for item in ("weights", "activations", "captured rows", "statistics", "solver",
                 "delta record", "rollback history"):
        assert item in out
    plan = plan_turn("mistral-7b", "bf16", edits=100)
    assert plan.modules == ["model.layers.29.mlp.down_proj", "model.layers.30.mlp.down_proj"]
    assert 7.2e9 * 2 < plan.item("weights") < 7.3e9 * 2
    # a budget that is too small: exit 1 and the reason names the largest item
    rc = main(["--config", "mistral-7b", "--edits", "100", "--budget-gib", "8"])
    assert rc == 1 and "does not fit in 8 GiB" in capsys.readouterr().out
    # the remedies the reason names do lower the peak
    full = plan_turn("llama-3-8b", "bf16", edits=100)
    assert not full.fits and "delta record" in full.reason and "history=0" in full.reason
    assert plan_turn("llama-3-8b", "bf16", edits=100, history=0).total_bytes < full.total_bytes
    host = plan_turn("llama-3-8b", "bf16", edits=100, delta_device="cpu")
    assert host.fits and host.total_bytes < full.total_bytes - full.item("delta record")
    # a local config.json, as JSON
    (tmp_path / "config.json").write_text(json.dumps(BUILTIN_CONFIGS["smollm2-135m"]))
    assert main(["--config", str(tmp_path), "--dtype", "fp32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["dtype"] == "float32" and len(data["modules"]) == 11
    # clear errors
    assert main(["--config", "no-such-model"]) == 2
    assert "neither a built-in name" in capsys.readouterr().err
    assert main(["--config", "mistral-7b", "--modules", "nope.layer"]) == 2
    assert main(["--config", "mistral-7b", "--modules", "lm_head"]) == 2   # the editor refuses it
    assert "output embedding" in capsys.readouterr().err
    capsys.readouterr()
    # --modules as the editing commands take it: comma-separated, @FILE, 'paper'
    two = ["model.layers.3.mlp.down_proj", "model.layers.4.mlp.down_proj"]
    (tmp_path / "modules.txt").write_text("\n".join(two) + "\n")
    for given in (two, [",".join(two)], ["@" + str(tmp_path / "modules.txt")]):
        assert main(["--config", "mistral-7b", "--json", "--modules", *given]) == 0
        assert json.loads(capsys.readouterr().out)["modules"] == two
    assert main(["--config", "mistral-7b", "--json", "--modules", "paper"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"] == plan.modules


def test_a_shared_backward_counts_the_groups_activations(capsys):
    """``--backward-group G`` (``plan_turn(backward_group=G)``): G micro-batches' activations
    and answer logits at once; more than the turn has counts as the turn's; 0 is refused."""
    def activations(*extra):
        assert main(["--config", "smollm2-135m", "--dtype", "fp32", "--edits", "100", "--json",
                     *extra]) == 0
        items = json.loads(capsys.readouterr().out)["items"]
        return next(i["bytes"] for i in items if i["name"] == "activations")

    one, four, ten = activations(), activations("--backward-group", "4"), activations(
        "--backward-group", "10")
    assert one < four < ten and ten == pytest.approx(10 * one, rel=0.05)
    assert activations("--backward-group", "50") == ten
    assert main(["--config", "smollm2-135m", "--backward-group", "0"]) == 2
    assert "backward_group must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--history", "-1"], ["--answer-tokens", "-5"],
                                  ["--memory", "-1"], ["--whiten", "-1"],
                                  ["--preserved-rows", "-10"], ["--seq-len", "0"],
                                  ["--delta-device", "gpu"], ["--budget-gib", "-1"],
                                  ["--budget-gib", "nan"], ["--answer-tokens", "nan"]],
                         ids=lambda f: " ".join(f))
def test_values_out_of_range_are_usage_errors(flag, capsys):
    """No verdict from nonsense: exit 2 and a line naming the value."""
    assert main(["--config", "mistral-7b", *flag]) == 2
    err = capsys.readouterr().err
    assert flag[0].lstrip("-").replace("-", "_") in err.replace("--budget-gib", "budget_gib")
