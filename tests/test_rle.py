"""COCO RLE ops: byte identity with pycocotools, round trips, strided inputs, threads, errors."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from magicseg_engine import _C, ops

mask_utils = pytest.importorskip("pycocotools.mask")

# pycocotools' decode predates numpy 2's __array__ copy keyword; the warning is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def coco_encode(masks: np.ndarray) -> list[bytes]:
    """Reference counts from pycocotools for a (N, H, W) batch (nonzero = foreground)."""
    binary = (np.asarray(masks) != 0).astype(np.uint8)
    return [r["counts"] for r in mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))]


def counts_of(rles: list[dict]) -> list[bytes]:
    return [r["counts"] for r in rles]


def pack(values: list[int]) -> bytes:
    """Writes already delta-coded run values in the COCO string format, to craft bad input."""
    out = bytearray()
    for x in values:
        while True:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(48 + (c | 0x20 if more else c))
            if not more:
                break
    return bytes(out)


def blobs(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Unions of random ellipses: the kind of shapes a segmenter produces."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w), bool)
    for m in out:
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(1, h / 2 + 1), rng.uniform(1, w / 2 + 1)
            m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return out


SIZES = [(1, 1), (1, 17), (23, 1), (2, 2), (7, 13), (13, 7), (64, 64), (101, 77), (480, 640)]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 0.97, 1.0])
def test_random_masks_match_pycocotools(h, w, density):
    rng = np.random.default_rng(h * 1000 + w)
    masks = (rng.random((3, h, w)) < density).astype(np.uint8)
    rles = ops.rle_encode(masks)
    assert counts_of(rles) == coco_encode(masks)
    assert all(r["size"] == [h, w] for r in rles)
    np.testing.assert_array_equal(ops.rle_decode(rles), masks)


@pytest.mark.parametrize("h,w", [(7, 13), (120, 90), (480, 640)])
def test_blobs_match_pycocotools(h, w):
    masks = blobs(6, h, w, seed=h)
    assert masks.any() and not masks.all()
    rles = ops.rle_encode(masks)
    assert counts_of(rles) == coco_encode(masks)
    np.testing.assert_array_equal(ops.rle_decode(rles), masks)


def test_all_zeros_and_all_ones_have_known_counts():
    masks = np.stack([np.zeros((4, 5), np.uint8), np.ones((4, 5), np.uint8)])
    # An all-ones mask starts with an empty run of zeros.
    assert counts_of(ops.rle_encode(masks)) == [b"d0", b"0d0"] == coco_encode(masks)


@pytest.mark.parametrize("h,w", [(1, 1), (5, 1), (1, 5), (6, 9), (33, 40)])
def test_single_pixel_anywhere(h, w):
    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]
    masks = np.zeros((len(corners), h, w), np.uint8)
    for k, (i, j) in enumerate(corners):
        masks[k, i, j] = 1
    rles = ops.rle_encode(masks)
    assert counts_of(rles) == coco_encode(masks)
    np.testing.assert_array_equal(ops.rle_decode(rles), masks)
    np.testing.assert_array_equal(ops.rle_area(rles), np.ones(len(corners)))


def test_first_and_last_pixel_in_column_major_order():
    masks = np.zeros((3, 6, 7), np.uint8)
    masks[0, 0, 0] = 1
    masks[1, -1, -1] = 1
    masks[2, 0, 0] = masks[2, -1, -1] = 1
    assert counts_of(ops.rle_encode(masks)) == coco_encode(masks)


def test_large_counts_use_negative_deltas():
    # Alternating long and short runs make later deltas negative, exercising sign bits.
    masks = np.zeros((1, 1000, 3), np.uint8)
    masks[0, 5:600, 0] = 1
    masks[0, 10:12, 1] = 1
    masks[0, 1:999, 2] = 1
    assert counts_of(ops.rle_encode(masks)) == coco_encode(masks)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.uint64, bool])
def test_dtypes_and_values_above_one_are_foreground(dtype):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 4, (4, 11, 9))  # 0 is background, 1..3 foreground
    masks = values.astype(dtype)
    rles = ops.rle_encode(masks)
    assert counts_of(rles) == coco_encode(values != 0)
    np.testing.assert_array_equal(ops.rle_decode(rles), (values != 0).astype(np.uint8))


def test_255_and_128_are_foreground():
    masks = np.zeros((1, 8, 8), np.uint8)
    masks[0, 1:3, 2:6] = 255
    masks[0, 5, 5] = 128
    assert counts_of(ops.rle_encode(masks)) == coco_encode(masks != 0)


def strided_views():
    base = blobs(6, 40, 50, seed=3).astype(np.uint8)
    rng = np.random.default_rng(3)
    noisy = base ^ (rng.random(base.shape) < 0.05)
    valued = (noisy * rng.integers(1, 256, noisy.shape)).astype(np.uint8)  # foreground 1..255
    return {
        "transposed": noisy.transpose(0, 2, 1),
        "step_slices": noisy[:, ::3, 1::2],
        "negative_steps": noisy[::-1, ::-1, ::-2],
        "batch_step": noisy[::2],
        "fortran": np.asfortranarray(noisy),
        "hwn_view": np.ascontiguousarray(noisy.transpose(1, 2, 0)).transpose(2, 0, 1),
        "coco_layout": np.asfortranarray(noisy.transpose(1, 2, 0)).transpose(2, 0, 1),
        "coco_layout_values": np.asfortranarray(valued.transpose(1, 2, 0)).transpose(2, 0, 1),
        "transposed_values": valued.transpose(0, 2, 1)[:, ::2],
        "broadcast": np.broadcast_to(noisy[0], (4, 40, 50)),
        "bool_transposed": noisy.astype(bool).transpose(0, 2, 1)[:, 3:, :-5],
    }


@pytest.mark.parametrize("name", list(strided_views()))
def test_non_contiguous_inputs(name):
    view = strided_views()[name]
    assert not view.flags.c_contiguous
    rles = ops.rle_encode(view)
    assert counts_of(rles) == coco_encode(np.ascontiguousarray(view))
    np.testing.assert_array_equal(ops.rle_decode(rles), view != 0)


def test_c_op_takes_strided_bool_directly():
    view = strided_views()["bool_transposed"]
    assert view.dtype == bool and not view.flags.c_contiguous
    assert _C.rle_encode(view, 2) == coco_encode(view)


def test_two_dimensional_input_gives_one_rle():
    mask = blobs(1, 30, 20, seed=5)[0]
    rles = ops.rle_encode(mask)
    assert len(rles) == 1
    assert rles[0]["counts"] == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
    np.testing.assert_array_equal(ops.rle_decode(rles[0]), mask)


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    masks = torch.from_numpy(blobs(3, 25, 31, seed=7))
    expected = coco_encode(masks.numpy())
    assert counts_of(ops.rle_encode(masks)) == expected
    assert counts_of(ops.rle_encode(masks.to(torch.uint8))) == expected
    assert counts_of(ops.rle_encode(masks.to(torch.int64) * 7)) == expected
    transposed = masks.transpose(1, 2)
    assert not transposed.is_contiguous()
    assert counts_of(ops.rle_encode(transposed)) == coco_encode(transposed.numpy())
    with pytest.raises(ValueError, match="bool or integer"):
        ops.rle_encode(masks.float().requires_grad_())


def test_empty_batch_and_empty_masks():
    assert ops.rle_encode(np.zeros((0, 5, 5), np.uint8)) == []
    assert ops.rle_decode([]).shape == (0, 0, 0)
    for shape in [(2, 0, 5), (2, 5, 0)]:
        masks = np.zeros(shape, np.uint8)
        rles = ops.rle_encode(masks)
        assert counts_of(rles) == coco_encode(masks)
        assert ops.rle_decode(rles).shape == shape


def test_decode_matches_pycocotools_on_its_own_strings():
    masks = np.concatenate([blobs(5, 97, 131, seed=11), np.random.default_rng(11).random((5, 97, 131)) < 0.3])
    coco = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    expected = mask_utils.decode(coco).transpose(2, 0, 1)
    np.testing.assert_array_equal(ops.rle_decode(coco), expected)
    as_str = [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in coco]
    np.testing.assert_array_equal(ops.rle_decode(as_str), expected)
    np.testing.assert_array_equal(ops.rle_area(coco), mask_utils.area(coco))


def test_decode_accepts_zero_length_runs_like_pycocotools():
    # pycocotools never writes empty runs after the first, but its decoder accepts them.
    rle = mask_utils.frPyObjects({"size": [3, 4], "counts": [2, 0, 3, 4, 0, 3]}, 3, 4)
    expected = mask_utils.decode(rle)
    np.testing.assert_array_equal(ops.rle_decode(rle), expected)
    assert ops.rle_area(rle) == int(mask_utils.area(rle)) == 7


def test_area_of_masks_with_different_sizes():
    masks = [blobs(1, h, w, seed=h)[0] for h, w in [(10, 20), (33, 7), (1, 1)]]
    rles = [ops.rle_encode(m)[0] for m in masks]
    np.testing.assert_array_equal(ops.rle_area(rles), [m.sum() for m in masks])
    assert ops.rle_area(rles[0]) == masks[0].sum()


@pytest.mark.parametrize("num_threads", [1, 2, 3, 8, 0, -1])
def test_thread_counts_give_identical_results(num_threads):
    masks = np.concatenate([blobs(9, 64, 48, seed=13), np.random.default_rng(13).random((8, 64, 48)) < 0.5])
    expected = coco_encode(masks)
    rles = ops.rle_encode(masks, num_threads=num_threads)
    assert counts_of(rles) == expected
    np.testing.assert_array_equal(ops.rle_decode(rles, num_threads=num_threads), masks)


def test_concurrent_calls_from_python_threads():
    batches = [blobs(8, 70 + k, 90 - k, seed=k) for k in range(12)]
    expected = [coco_encode(b) for b in batches]
    start = threading.Barrier(6)

    def work(k: int) -> tuple[list[bytes], np.ndarray]:
        if k < 6:
            start.wait()
        rles = ops.rle_encode(batches[k], num_threads=2)
        return counts_of(rles), ops.rle_decode(rles, num_threads=2)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(work, range(len(batches))))
    for k, (counts, decoded) in enumerate(results):
        assert counts == expected[k]
        np.testing.assert_array_equal(decoded, batches[k])


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12),
        elements=st.sampled_from([0, 0, 1, 1, 2, 255]),
    )
)
def test_property_byte_identity_and_round_trip(masks):
    rles = ops.rle_encode(masks, num_threads=2)
    assert counts_of(rles) == coco_encode(masks)
    np.testing.assert_array_equal(ops.rle_decode(rles), masks != 0)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(bool, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=10)), st.data())
def test_property_strided_views(masks, data):
    steps = [data.draw(st.sampled_from([1, 2, -1, -3])) for _ in range(3)]
    view = masks[:: steps[0], :: steps[1], :: steps[2]]
    view = view.transpose(0, 2, 1) if data.draw(st.booleans()) else view
    assert counts_of(ops.rle_encode(view)) == coco_encode(np.ascontiguousarray(view))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.data())
def test_property_decode_of_arbitrary_runs_matches_pycocotools(h, w, data):
    # Cut points may repeat, giving the empty runs pycocotools' decoder accepts.
    cuts = sorted(data.draw(st.lists(st.integers(0, h * w), max_size=2 * h * w)))
    runs = np.diff([0, *cuts, h * w]).tolist()
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    expected = mask_utils.decode(rle)
    np.testing.assert_array_equal(ops.rle_decode(rle), expected)
    assert ops.rle_area(rle) == expected.sum()


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), ()])
def test_encode_rejects_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"shape \(H, W\) or \(N, H, W\)"):
        ops.rle_encode(np.zeros(shape, np.uint8))


def test_c_op_rejects_wrong_ndim_and_dtype():
    with pytest.raises(ValueError, match="ndim=2"):
        _C.rle_encode(np.zeros((3, 3), np.uint8), 1)
    with pytest.raises(ValueError, match="bool or uint8.*int32"):
        _C.rle_encode(np.zeros((1, 3, 3), np.int32), 1)


def test_encode_rejects_float_masks():
    with pytest.raises(ValueError, match="float32"):
        ops.rle_encode(np.zeros((1, 3, 3), np.float32))


@pytest.mark.parametrize(
    "counts,match",
    [
        (b"0 1", "invalid character 32 at offset 1"),
        (b"3p", "invalid character 112"),
        (b"3\x00", "invalid character 0"),
        (b"3P", "ends in the middle"),  # 'P' has the continuation bit set
        (b"o" * 13 + b"0", "longer than 12 characters"),
        (b"3", "runs cover 3 pixels, expected h\\*w = 12"),
        (b"", "runs cover 0 pixels"),
        (b"d0", "cover more than h\\*w = 12"),
    ],
)
def test_decode_rejects_malformed_counts(counts, match):
    rle = {"size": [3, 4], "counts": counts}
    with pytest.raises(ValueError, match=match):
        ops.rle_decode(rle)
    with pytest.raises(ValueError, match=match):
        ops.rle_area(rle)


def test_decode_rejects_negative_run_and_names_the_mask():
    good = ops.rle_encode(np.eye(4, dtype=np.uint8))[0]
    # Runs 2, 3, 4 then a delta of -5 against run 1 (= 3): a negative length.
    bad = {"size": [4, 4], "counts": pack([2, 3, 4, -5])}
    with pytest.raises(ValueError, match=r"counts\[1\]: run 3 has negative length"):
        ops.rle_decode([good, bad, good], num_threads=3)


def test_decode_reports_the_first_bad_mask_whatever_the_threads():
    good = ops.rle_encode(np.eye(5, dtype=np.uint8))[0]
    rles = [good] * 20
    rles[7] = {"size": [5, 5], "counts": b"5"}
    rles[15] = {"size": [5, 5], "counts": b"!"}
    for num_threads in (1, 2, 4):
        with pytest.raises(ValueError, match=r"counts\[7\]"):
            ops.rle_decode(rles, num_threads=num_threads)


def test_pack_matches_encoder_so_crafted_inputs_are_meaningful():
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, 1:3, 1:3] = 1  # runs 5, 2, 2, 2, 5 -> deltas from run 3 on: 2-2, 5-2
    assert coco_encode(mask) == [pack([5, 2, 2, 0, 3])]


def test_decode_rejects_mixed_sizes_and_bad_dicts():
    a = ops.rle_encode(np.ones((2, 2), np.uint8))[0]
    b = ops.rle_encode(np.ones((3, 2), np.uint8))[0]
    with pytest.raises(ValueError, match=r"rles\[1\] has size \[3, 2\] but rles\[0\] has \[2, 2\]"):
        ops.rle_decode([a, b])
    with pytest.raises(ValueError, match="'size' and 'counts'"):
        ops.rle_decode([{"counts": b"04"}])
    with pytest.raises(ValueError, match="uncompressed RLE"):
        ops.rle_decode({"size": [2, 2], "counts": [0, 4]})
    with pytest.raises(ValueError, match="non-ASCII"):
        ops.rle_decode({"size": [2, 2], "counts": "0é"})
    with pytest.raises(ValueError, match="must be non-negative"):
        _C.rle_decode([b"0"], -1, 2, 1)
    with pytest.raises(TypeError, match="must be bytes"):
        _C.rle_decode(["04"], 2, 2, 1)
    with pytest.raises(ValueError, match="2 counts but 1 sizes"):
        _C.rle_area([b"04", b"04"], [(2, 2)])


@pytest.mark.parametrize("failure", ["not-built", "rebuild-failed"])
def test_an_extension_that_cannot_load_is_one_clear_import_error(monkeypatch, failure):
    """Without _C (a checkout never installed), or when an editable install's rebuild on import
    fails, importing the ops says what to run instead of ending in CMake's traceback."""
    import importlib
    import subprocess
    import sys

    import magicseg_engine

    monkeypatch.delitem(sys.modules, "magicseg_engine.ops")
    monkeypatch.delattr(magicseg_engine, "_C")
    if failure == "not-built":
        monkeypatch.setitem(sys.modules, "magicseg_engine._C", None)
    else:
        class FailingRebuild:
            """The editable install's finder when its CMake rebuild fails."""

            def find_spec(self, name, path=None, target=None):
                if name == "magicseg_engine._C":
                    raise subprocess.CalledProcessError(1, ["cmake", "--build", "."])
                return None

        monkeypatch.delitem(sys.modules, "magicseg_engine._C")
        monkeypatch.setattr(sys, "meta_path", [FailingRebuild(), *sys.meta_path])
    with pytest.raises(ImportError) as err:
        importlib.import_module("magicseg_engine.ops")
    message = str(err.value)
    assert "\n" not in message and "magicseg_engine._C" in message and "pip install" in message
    if failure == "rebuild-failed":
        assert "rebuilding it on import failed" in message
