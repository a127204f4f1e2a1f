"""ultraedit.integrations: the one-line patches of the official and EasyEdit UltraEdit editors.

The stand-in editors (tests/integration_standins.py) follow each interface; the patched and the
unpatched editor run on identical copies of a tiny random-init Llama, and their shifts are both
compared with a float64 evaluation of the original formula.
"""
import copy
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import ue_tiny_model  # noqa: E402
from integration_standins import (  # noqa: E402
    EasyEditUltraEdit, OfficialUltraEdit, OfficialUltraEditNoNet, easyedit_config, fp64_shift,
    get_module, get_shape, official_config, random_tuples)
from tolerances import FACTOR, TOLERANCES, rel_err  # noqa: E402

from ultraedit.integrations import (  # noqa: E402
    IntegrationError, apply_ultraedit_kernels, detect_editor_kind, is_patched,
    revert_ultraedit_kernels, shift_from_normalizer)

VOCAB = 97
# down_proj: 48 -> 32 (three modules share one normalizer); up_proj: 32 -> 48
MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj",
           "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
LR = 1e-4


_BASE_MODEL = []


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread avoids oversubscription on shared CPUs (4x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model():
    """A fresh copy of one tiny random-init Llama (built once: importing the class is slow)."""
    if not _BASE_MODEL:
        _BASE_MODEL.append(ue_tiny_model("llama", VOCAB, seed=0))
    return copy.deepcopy(_BASE_MODEL[0])


def _check_shifts(patched, unpatched, kv, normalizers, lr=LR):
    """Both against fp64 of the original formula; patched within 2x the original's fp32 error
    (plus the dual-solve table entry), and the two close to each other."""
    assert set(patched) == set(unpatched)
    for name, shift in patched.items():
        keys, grads = kv[name]
        ref = fp64_shift(keys, grads, normalizers[name], lr)
        assert shift.dtype == torch.float32 and shift.shape == unpatched[name].shape == ref.shape
        err_orig = rel_err(unpatched[name], ref)
        err_new = rel_err(shift, ref)
        assert err_orig < TOLERANCES["primal"][torch.float32], (name, err_orig)
        assert err_new <= FACTOR * err_orig + TOLERANCES["dual"][torch.float32], (name, err_new, err_orig)
        assert rel_err(shift, unpatched[name]) <= FACTOR * err_orig + TOLERANCES["dual"][torch.float32]


def _official_kv(editor, n_edits, batch_size, quirk=True):
    """Per module name: the (keys, gradients) the original's predict uses, from its files."""
    out = {}
    n_k = -(-n_edits // batch_size)
    n_g = n_edits // batch_size if quirk else n_k
    for m, name in enumerate(editor.config.model.edit_modules):
        keys = torch.cat([torch.load(f"{editor._dir()}/{m}_{i}_keys.pth") for i in range(n_k)])
        grads = torch.cat([torch.load(f"{editor._dir()}/{m}_{i}_values_grad.pth") for i in range(n_g)])
        grads = torch.cat([grads, grads.new_zeros(keys.shape[0] - grads.shape[0], grads.shape[1])])
        out[name] = (keys, grads)
    return out


def _normalizers(editor, net_id=None):
    out = {}
    names = getattr(editor.config, "inner_params", None) or editor.config.model.edit_modules
    for name in names:
        shape = get_shape(get_module(editor.model, name))
        ln = editor.lifelong_normalizer
        out[name] = (ln[net_id] if net_id is not None else ln)[str(shape)]
    return out


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _pair_official(tmp_path, cls=OfficialUltraEdit, n_edits=12, batch_size=4, **kw):
    model = _model()
    ref = cls(official_config(MODULES, tmp_path / "orig", n_edits, batch_size, lr=LR, **kw), model)
    new = cls(official_config(MODULES, tmp_path / "patched", n_edits, batch_size, lr=LR, **kw),
              copy.deepcopy(model))
    return ref, new


@pytest.mark.parametrize("cls", [OfficialUltraEdit, OfficialUltraEditNoNet])
def test_official_patched_matches_unpatched_over_two_turns(tmp_path, cls):
    ref, new = _pair_official(tmp_path, cls)
    assert apply_ultraedit_kernels(new) == "official" and is_patched(new)
    args = (0,) if cls is OfficialUltraEdit else ()
    net = 0 if cls is OfficialUltraEdit else None
    for turn in range(2):                       # lifelong: the second turn sees turn 1's stats
        tuples = random_tuples(12, 4, VOCAB, seed=turn)
        ref.cache(tuples, *args)
        new.cache(copy.deepcopy(tuples), *args)
        for a, b in zip(_normalizers(ref, net).values(), _normalizers(new, net).values()):
            _same_state(a, b)
        assert not os.listdir(new._dir()), "the patched cache must not write feature files"
        shifts_ref = ref.predict_param_shifts(*args)
        shifts_new = new.predict_param_shifts(*args)
        _check_shifts(shifts_new, shifts_ref, _official_kv(ref, 12, 4), _normalizers(ref, net))
        ref.edit_model(shifts_ref, False)
        new.edit_model(shifts_ref, False)       # identical weights for the next turn
    assert int(_normalizers(new, net)[MODULES[0]].n) > 0


def test_official_dual_and_primal_paths(tmp_path):
    # N ≈ 24 answer rows: dual for down_proj (d_in 48); 60 rows: primal for up_proj (d_in 32)
    for n_edits in (8, 24):
        ref, new = _pair_official(tmp_path / str(n_edits), n_edits=n_edits, batch_size=8)
        apply_ultraedit_kernels(new)
        tuples = random_tuples(n_edits, 8, VOCAB, seed=n_edits)
        ref.cache(tuples, 0)
        new.cache(tuples, 0)
        _check_shifts(new.predict_param_shifts(0), ref.predict_param_shifts(0),
                      _official_kv(ref, n_edits, 8), _normalizers(ref, 0))
    for method in ("dual", "primal"):
        other = OfficialUltraEdit(new.config, new.model)
        apply_ultraedit_kernels(other, method=method)
        other.cache(tuples, 0)
        _check_shifts(other.predict_param_shifts(0), ref.predict_param_shifts(0),
                      _official_kv(ref, 24, 8), _normalizers(ref, 0))


def test_official_floor_quirk_reproduced_by_default_and_fixable(tmp_path):
    # 10 edits in micro-batches of 4: keys of 3 micro-batches, gradients of only 2
    ref, new = _pair_official(tmp_path, n_edits=10, batch_size=4)
    apply_ultraedit_kernels(new)
    tuples = random_tuples(10, 4, VOCAB, seed=3)
    ref.cache(tuples, 0)
    new.cache(tuples, 0)
    kv_quirk = _official_kv(ref, 10, 4)
    _check_shifts(new.predict_param_shifts(0), ref.predict_param_shifts(0), kv_quirk,
                  _normalizers(ref, 0))

    fixed = OfficialUltraEdit(official_config(MODULES, tmp_path / "fixed", 10, 4, lr=LR),
                              copy.deepcopy(ref.model))
    apply_ultraedit_kernels(fixed, reproduce_floor_quirk=False)
    fixed.cache(tuples, 0)
    for a, b in zip(_normalizers(ref, 0).values(), _normalizers(fixed, 0).values()):
        _same_state(a, b)
    shifts = fixed.predict_param_shifts(0)
    kv_all = _official_kv(ref, 10, 4, quirk=False)
    for name, shift in shifts.items():
        keys, grads = kv_all[name]
        assert rel_err(shift, fp64_shift(keys, grads, _normalizers(ref, 0)[name], LR)) < TOLERANCES["primal"][torch.float32]
        assert rel_err(shift, fp64_shift(*kv_quirk[name], _normalizers(ref, 0)[name], LR)) > 1e-3


def test_easyedit_patched_matches_unpatched_over_two_turns():
    model = _model()
    ref = EasyEditUltraEdit(model, easyedit_config(MODULES, lr=LR))
    new = EasyEditUltraEdit(copy.deepcopy(model), easyedit_config(MODULES, lr=LR))
    assert detect_editor_kind(new) == "easyedit"
    assert apply_ultraedit_kernels(new) == "easyedit"
    for turn in range(2):
        tuples = random_tuples(12, 4, VOCAB, seed=10 + turn)
        kv_ref = ref.cache(tuples)
        kv_new = new.cache(tuples)
        for key in ref.lifelong_normalizer:
            _same_state(ref.lifelong_normalizer[key], new.lifelong_normalizer[key])
        shifts_ref = ref.predict_param_shifts(kv_ref)
        shifts_new = new.predict_param_shifts(module_kv_map=kv_new)
        kv = {name: (torch.cat([e["keys"] for e in kv_ref[m].values()]),
                     torch.cat([e["values_grad"] for e in kv_ref[m].values()]))
              for m, name in enumerate(MODULES)}
        _check_shifts(shifts_new, shifts_ref, kv, _normalizers(ref))
        ref.edit_model(shifts_ref, False)
        new.edit_model(shifts_ref, False)


def test_revert_restores_the_original_methods(tmp_path):
    official = OfficialUltraEdit(official_config(MODULES, tmp_path, 4), _model())
    easy = EasyEditUltraEdit(_model(), easyedit_config(MODULES))
    for editor, names in ((official, ("cache", "predict_param_shifts")),
                          (easy, ("predict_param_shifts",))):
        cls = type(editor)
        class_funcs = {n: cls.__dict__[n] for n in names}
        assert not any(n in vars(editor) for n in names)
        assert apply_ultraedit_kernels(editor) in ("official", "easyedit")
        assert apply_ultraedit_kernels(editor) == detect_editor_kind(editor)   # idempotent
        for n in names:
            assert n in vars(editor) and getattr(editor, n).__wrapped_original__.__func__ is getattr(cls, n)
            assert cls.__dict__[n] is class_funcs[n]     # the class is untouched
        assert revert_ultraedit_kernels(editor) is True
        assert revert_ultraedit_kernels(editor) is False
        for n in names:
            assert n not in vars(editor)
            assert getattr(editor, n).__func__ is getattr(cls, n)
        assert not is_patched(editor)

    # an instance attribute that existed before the patch comes back exactly
    easy.predict_param_shifts = marker = lambda module_kv_map: {}
    apply_ultraedit_kernels(easy)
    assert easy.predict_param_shifts is not marker
    revert_ultraedit_kernels(easy)
    assert easy.predict_param_shifts is marker


def test_errors_name_what_is_missing():
    with pytest.raises(IntegrationError) as err:
        apply_ultraedit_kernels(object())
    msg = str(err.value)
    assert "predict_param_shifts(module_kv_map)" in msg and "config.inner_params" in msg
    assert "cache(tuples)" in msg and "config.editor.cache_dir" in msg
    assert "lifelong_normalizer" in msg and "model" in msg

    class HalfOfficial:
        model = torch.nn.Linear(2, 2)
        lifelong_normalizer = torch.nn.ModuleDict()
        config = SimpleNamespace(model=SimpleNamespace(edit_modules=[]),
                                 editor=SimpleNamespace(lr=1.0), dataset=SimpleNamespace(n_edits=1))

        def cache(self, tuples):
            pass

        def predict_param_shifts(self):
            return {}
    with pytest.raises(IntegrationError) as err:
        apply_ultraedit_kernels(HalfOfficial())
    msg = str(err.value)
    assert "config.editor.cache_dir" in msg and "dataset.batch_size" in msg
    assert "config.model.edit_modules" not in msg.split("official")[-1]
    with pytest.raises(ValueError):
        apply_ultraedit_kernels(HalfOfficial(), method="lu")


def test_shift_from_normalizer_matches_fp64_and_checks_shapes():
    from integration_standins import RunningMeanStd
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(30, 40, generator=g) * 3 + 1
    grads = torch.randn(30, 20, generator=g) * 1e-3
    norm = RunningMeanStd(60)
    for part in (slice(0, 10), slice(10, 30)):
        norm.update(torch.cat([keys[part], grads[part]], 1))
    ref = fp64_shift(keys, grads, norm, 1e-3)
    for method in ("auto", "dual", "primal"):
        out = shift_from_normalizer(keys, grads, norm, 1e-3, method=method)
        assert rel_err(out, ref) < TOLERANCES["dual" if method != "primal" else "primal"][torch.float32]
    with pytest.raises(ValueError, match="d_in \\+ d_out"):
        shift_from_normalizer(keys, grads[:, :10], norm, 1e-3)
    with pytest.raises(IntegrationError, match="std"):
        shift_from_normalizer(keys, grads, SimpleNamespace(mean=norm.mean), 1e-3)


def test_official_cache_before_patch_falls_back_to_the_files(tmp_path, caplog):
    editor = OfficialUltraEdit(official_config(MODULES, tmp_path, 8, 4, lr=LR), _model())
    tuples = random_tuples(8, 4, VOCAB, seed=5)
    editor.cache(tuples, 0)                 # unpatched: writes the files
    expected = editor.predict_param_shifts(0)
    apply_ultraedit_kernels(editor)
    with caplog.at_level("WARNING", logger="ultraedit.integrations"):
        got = editor.predict_param_shifts(0)
    assert "nothing was cached in memory" in caplog.text
    for name in expected:
        assert torch.equal(got[name], expected[name])


def test_only_feature_files_under_cache_dir_are_kept_in_memory(tmp_path):
    from ultraedit.integrations import _FeatureStore, _saves_kept_in
    store = _FeatureStore()
    root = tmp_path / "cache"
    (root / "run").mkdir(parents=True)
    t = torch.arange(6.0).reshape(2, 3)
    with _saves_kept_in(store, root):
        torch.save(t, f"{root}/run/3_1_keys.pth")                 # kept
        torch.save(t, str(tmp_path / "0_0_keys.pth"))              # outside cache_dir: written
        torch.save(t, f"{root}/run/model.pth")                     # other name: written
        torch.save({"a": t}, f"{root}/run/0_0_values_grad.pth")    # not a tensor: written
    assert torch.save.__module__.startswith("torch")
    assert set(store.tensors) == {(3, 1, "keys")} and store.tensors[(3, 1, "keys")] is t
    assert sorted(os.listdir(root / "run")) == ["0_0_values_grad.pth", "model.pth"]
    assert (tmp_path / "0_0_keys.pth").is_file()
