"""The host build of ``gram`` (``cpp`` backend, ``torch.ops.ultraedit_C.gram``): the lower
triangle's micro-tiles only, mirrored; against float64 on odd shapes that cross the kernel's
tile (6 x 16 / 6 x 8), panel (256) and row-block (96) edges, and through ``uk.gram``."""
import pytest
import torch

import ultraedit_kernels as uk
from fp64_reference import gram_references, realistic_features
from tolerances import bound, rel_err
from ultraedit_kernels import _backends, _extension

HOST_REASON = _extension.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(HOST_REASON is not None,
                                reason=f"host build of ultraedit_kernels._C not available: {HOST_REASON}")

# (m, d): one row, one tile, partial tiles, several panels (d > 256), several row blocks (m > 96)
SHAPES = [(1, 37), (5, 3), (17, 33), (50, 61), (97, 300), (131, 40), (203, 517)]


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_and_is_exactly_symmetric(shape, dtype, rows, monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    m, d = shape
    keys, _ = realistic_features(m, d, 1, seed=m + d)
    x = (keys if rows else keys.T.contiguous()).to(dtype)
    assert _backends.select("gram", x.device, x, 0.7, rows)[0] == "cpp"
    got = uk.gram(x, 0.7, rows)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == compute and got.shape == (m, m)
    ref, plain = gram_references(x, 0.7, rows)
    assert rel_err(got, ref) <= bound("gram", compute, rel_err(plain, ref))
    assert torch.equal(got, got.T)


def test_non_contiguous_input_and_threads(monkeypatch):
    monkeypatch.setenv("ULTRAEDIT_BACKEND", "cpp")
    keys, _ = realistic_features(1100, 1801, 1, seed=3)
    x = keys[:, ::2]             # strided columns; m * m * d >= 2**30: the threaded path
    ref, plain = gram_references(x, 1.0, True)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):                        # row blocks split over the threads
            torch.set_num_threads(threads)
            got = uk.gram(x, 1.0)
            assert rel_err(got, ref) <= bound("gram", torch.float32, rel_err(plain, ref))
            assert torch.equal(got, got.T)
    finally:
        torch.set_num_threads(saved)


def test_the_native_op_and_its_fake_agree():
    uk.gram_op  # noqa: B018  (the module registering the fake is imported)
    from ultraedit_kernels.gram import _cpp_available

    assert _cpp_available(torch.device("cpu")) is None
    keys, _ = realistic_features(20, 7, 1, seed=5)
    torch.library.opcheck(torch.ops.ultraedit_C.gram.default, (keys, 1.0, True))
    torch.library.opcheck(torch.ops.ultraedit_C.gram.default, (keys, 1.0, False))


def test_bad_input_is_a_clear_error():
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.ultraedit_C.gram(torch.ones(3, 4, dtype=torch.int32), 1.0, True)
    with pytest.raises(RuntimeError, match="matrix"):
        torch.ops.ultraedit_C.gram(torch.ones(3), 1.0, True)
