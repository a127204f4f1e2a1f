"""Whitened value gradients (``EditConfig.whiten``): the covariance and its inverse square root
against float64 references, the solver's pseudo-values, and the state they live in (snapshot,
rollback, refused turns, save/load and resume)."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from _state_common import (MODULES, REQUESTS, assert_same, one_thread,  # noqa: F401 (autouse)
                           snapshot, tiny_llama, turn_requests)
from conftest import ue_make_tokenizer
from tolerances import F32, F64, bound, rel_err
from ultraedit import EditConfig, UltraEditor
from ultraedit.solver import solve
from ultraedit.whitening import GradientCovariance, Whitener, whitened_pseudo_values
from ultraedit_kernels import EPS, RunningStats


@pytest.fixture(scope="module")
def tok():
    return ue_make_tokenizer(with_bos=True)


def _rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(d, generator=g)   # a direction every row shares: what whitening damps
    return torch.randn(n, d, generator=g) + 3.0 * torch.randn(n, 1, generator=g) * shared


# ---------------------------------------------------------------------- the math
def test_covariance_and_inverse_square_root_against_float64():
    d, eps = 13, 1e-3
    blocks = [_rows(n, d, seed) for seed, n in enumerate((7, 1, 29))]   # odd sizes, one 1-row
    cov = GradientCovariance(d)
    for b in blocks:
        cov.add(b)
    rows = torch.cat(blocks).double()
    mean = rows.mean(0)
    ref = (rows - mean).T @ (rows - mean) / rows.shape[0]
    ref.diagonal().add_(eps * ref.diagonal().mean())
    w = cov.whitener(eps)
    assert int(cov.count) == rows.shape[0]
    assert rel_err(w.mean, mean) <= 1e-13
    assert torch.equal(w.inv_sqrt, w.inv_sqrt.T) or rel_err(w.inv_sqrt, w.inv_sqrt.T) <= 1e-13
    # Σ^{-1/2} Σ Σ^{-1/2} = I, and it is the symmetric root: (Σ^{-1/2})² = Σ^{-1}
    assert rel_err(w.inv_sqrt @ ref @ w.inv_sqrt, torch.eye(d, dtype=F64)) <= 1e-10
    assert rel_err(w.inv_sqrt @ w.inv_sqrt, torch.linalg.inv(ref)) <= 1e-10


def test_no_spread_gives_the_identity():
    cov = GradientCovariance(5)
    row = torch.randn(1, 5)
    w = cov.add(row).whitener(1e-3)
    assert torch.equal(w.inv_sqrt, torch.eye(5, dtype=F64))
    assert torch.equal(w.apply(row), torch.zeros(1, 5))   # g - m = 0 exactly, as the paper's ĝ


def test_whitened_pseudo_values_against_float64():
    n, d_in, d_out, lr = 11, 17, 9, 3e-4
    keys, grads = torch.randn(n, d_in), _rows(n, d_out, 5)
    stats = RunningStats(d_in + d_out).update(torch.cat([keys, grads], 1).double())
    cov = GradientCovariance(d_out).add(grads)
    w = cov.whitener(1e-2)
    v = whitened_pseudo_values(keys, grads, stats, w, lr, EPS)
    k_hat = (keys.double() - stats.mean[:d_in]) / (stats.std[:d_in] + EPS)
    ref = -lr * k_hat.pow(2).sum(1, keepdim=True) * ((grads.double() - w.mean) @ w.inv_sqrt)
    assert v.dtype == F32 and rel_err(v, ref) <= bound("pseudo_values", F32) + 1e-6
    v64 = whitened_pseudo_values(keys.double(), grads.double(), stats, w, lr, EPS)
    assert v64.dtype == F64 and rel_err(v64, ref) <= bound("pseudo_values", F64)


def test_diagonal_whitener_is_the_papers_pseudo_values():
    """With Σ^{-1/2} = diag(1/(s_g + ε)) and the statistics' mean the whitened path computes the
    paper's V, and so the same update."""
    n, d_in, d_out = 9, 23, 7
    keys, grads = torch.randn(n, d_in), torch.randn(n, d_out)
    stats = RunningStats(d_in + d_out).update(torch.cat([keys, grads], 1).double())
    diag = Whitener(stats.mean[d_in:].clone(), torch.diag(1.0 / (stats.std[d_in:] + EPS)))
    paper = solve(keys, grads, stats, lr=1e-3, ridge=1.0)
    whitened = solve(keys, grads, stats, lr=1e-3, ridge=1.0, whitener=diag)
    assert paper.kind == whitened.kind == "dual"
    assert rel_err(whitened.tensor, paper.tensor) <= bound("reorder", F32)


def test_load_state_dict_refuses_bad_values():
    cov = GradientCovariance(3).add(torch.randn(4, 3))
    sd = {k: v.clone() for k, v in cov.state_dict().items()}
    other = GradientCovariance(3)
    other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))
    with pytest.raises(ValueError, match="does not fit dim 4"):
        GradientCovariance(4).load_state_dict(sd)
    sd["outer"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        GradientCovariance(3).load_state_dict(sd)
    with pytest.raises(ValueError, match="n x 3"):
        cov.add(torch.randn(2, 4))


# ---------------------------------------------------------------------- the config
def test_config_field():
    assert EditConfig().whiten == 0.0 and "whiten" not in EditConfig().beyond_paper()
    cfg = EditConfig(whiten=1e-3)
    assert cfg.beyond_paper() == {"whiten": 1e-3}
    assert EditConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (-1e-3, float("nan"), "1e-3", True):
        with pytest.raises(ValueError, match="whiten"):
            EditConfig(whiten=bad)


# ---------------------------------------------------------------------- the editor
def _editor(tok, **kw):
    return UltraEditor(tiny_llama(len(tok)), tok, modules=MODULES, lr=1e-2, micro_batch=3,
                       **kw)


def test_editor_whitens_and_keeps_the_state(tok):
    plain, white = _editor(tok), _editor(tok, whiten=1e-3)
    for t in range(2):
        plain.edit(turn_requests(t))
        white.edit(turn_requests(t))
    assert plain.state.whitening == {}
    # one covariance per statistics key (two modules share the 48 -> 32 shape), all rows so far
    assert set(white.state.whitening) == set(white.stats)
    for key, cov in white.state.whitening.items():
        assert int(cov.count) == int(white.stats[key].count)
    changed = [n for n in MODULES if not torch.equal(
        white.model.get_submodule(n).weight, plain.model.get_submodule(n).weight)]
    assert changed == MODULES

    before = snapshot(white)
    white.edit(turn_requests(2))
    white.rollback()
    assert_same(before, snapshot(white))


def test_refused_turn_leaves_the_covariance(tok, monkeypatch):
    ed = _editor(tok, whiten=1e-3)
    ed.edit(turn_requests(0))
    before = snapshot(ed)

    def fail(updates):
        raise RuntimeError("injected failure while applying")

    monkeypatch.setattr(ed.journal, "apply", fail)
    with pytest.raises(RuntimeError, match="injected"):
        ed.edit(turn_requests(1))
    assert_same(before, snapshot(ed))


def test_save_load_resume_is_bit_exact(tmp_path, tok):
    ed = _editor(tok, whiten=1e-2, memory=1.0)
    ed.edit(REQUESTS)
    path = ed.save_state(tmp_path / "st")
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    kinds = sorted(m.get("kind", "stats") for m in manifest["stats"])
    assert kinds.count("whitening") == len(ed.state.whitening) == 2
    assert manifest["config"]["whiten"] == 1e-2
    resumed = UltraEditor.load_state(path, tiny_llama(len(tok)), tok)
    assert resumed.whiten == 1e-2
    assert_same(snapshot(ed), snapshot(resumed))
    ed.edit(turn_requests(1))
    resumed.edit(turn_requests(1))
    assert_same(snapshot(ed), snapshot(resumed))


def test_states_without_the_field_still_load(tmp_path, tok):
    ed = _editor(tok)
    ed.edit(turn_requests(0))
    path = Path(ed.save_state(tmp_path / "st"))
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["config"]["whiten"]   # written before the option existed
    from ultraedit.serialization import CHECKSUM, read_dir, write_dir

    _, files = read_dir(path, expect_kind="state")
    written = {"files", "written_by", "format", "format_version", "created", CHECKSUM}
    manifest = {k: v for k, v in manifest.items() if k not in written}
    write_dir(tmp_path / "old", files, manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = UltraEditor.load_state(tmp_path / "old", tiny_llama(len(tok)), tok)
    assert resumed.whiten == 0.0 and resumed.state.whitening == {}


def test_bf16_model_with_accumulation(tok):
    ed = UltraEditor(tiny_llama(len(tok), torch.bfloat16), tok, modules=MODULES, lr=1e-2,
                     micro_batch=3, whiten=1e-3)
    base = {n: m.weight.detach().clone() for n, m in ed.modules.items()}
    for t in range(2):
        ed.edit(turn_requests(t))
    assert ed.journal.accumulate
    for name, module in ed.modules.items():
        assert module.weight.dtype == torch.bfloat16 and bool(torch.isfinite(module.weight).all())
        assert not torch.equal(module.weight, base[name])
    assert all(cov.outer.dtype == F64 for cov in ed.state.whitening.values())
