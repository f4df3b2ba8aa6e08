"""Tiles and the autotuner (attn_zoo.kernels.tuning): the tiles a GPU launch runs
(128-row, rectangular) give the same results as the interpreter's 64 x 64, the
candidates fit, the autotuner picks the fastest and skips what cannot run."""

import contextlib

import pytest
import torch

import attn_zoo
import attn_zoo.kernels.flash
from attn_zoo.kernels import layout as layout_module
from attn_zoo.kernels import tuning
from attn_zoo.kernels.layout import Band, Window, build_layout
from attn_zoo.kernels.tuning import Tile
from conftest import check_impl, small

pytest.importorskip("triton")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("kind", tuning.KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_default_tile_is_the_first_candidate_and_fits(dim, dtype, kind):
    tile = tuning.default_tile(dim, dtype, kind)
    found = tuning.candidates(dim, dtype, kind)
    assert found[0] == tile
    assert len(set(found)) == len(found) > 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert all(tuning.fits(t, dim, itemsize, kind) for t in found)


def test_fits_prunes_what_cannot_run():
    # K and V at 128 x 128, 4 stages, fp16: 256 KiB of shared memory
    assert not tuning.fits(Tile(128, 128, 8, 4), 128, 2)
    # a 128 x 128 float32 accumulator and scores on 4 warps: 256 values per thread
    assert not tuning.fits(Tile(128, 128, 4, 2), 128, 2)
    # xl's key features beside K and V: 3 x (32 + 32 + 32) KiB at 128 x 128, head_dim 128
    assert tuning.fits(Tile(128, 128, 8, 3), 128, 2, "plain")
    assert not tuning.fits(Tile(128, 128, 8, 3), 128, 2, "relative")
    assert tuning.fits(Tile(128, 128, 8, 3), 128, 2)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind 'banded'; accepted: dense, plain"):
        tuning.default_tile(64, torch.float16, "banded")


def test_a_part_of_a_band_alone_is_dense_and_any_other_rule_makes_it_plain():
    """A launch's kind picks its backward programs (a band alone walks wider dK/dV steps
    at head_dim 128); key padding keeps a band dense, a window does not."""
    k = torch.zeros(1, 1, 256, 64)
    layout = build_layout(256, 256, Band(lo=0), None, block_m=128, block_n=128)
    part = attn_zoo.kernels.flash.Part(k, k, layout, Band(lo=0))
    assert part.kind == "dense"
    keep = torch.ones(1, 256, dtype=torch.bool)
    assert attn_zoo.kernels.flash.Part(k, k, layout, Band(lo=0), keep=keep).kind == "dense"
    window = Window(128, 128, lo=0, hi=127)
    assert attn_zoo.kernels.flash.Part(k, k, layout, Band(), window).kind == "plain"


def test_autotune_picks_the_fastest_skips_failures_and_caches(monkeypatch):
    monkeypatch.setattr(tuning, "CHOSEN", {})
    configs = [Tile(128, 128, 8), Tile(64, 64, 4), Tile(32, 32, 4)]
    times = {Tile(128, 128, 8): 3.0, Tile(64, 64, 4): 1.0}
    seen = []

    def timer(call):
        tile = tuning.tile_for(torch.empty(1, 1, 1, 64))  # the tile the call runs
        seen.append(tile)
        if tile not in times:
            raise RuntimeError("out of resources: shared memory")
        return times[tile]

    key = ("dense", (), 64, "torch.float16", True, 1024)
    assert tuning.autotune(key, lambda: None, configs, timer) == Tile(64, 64, 4)
    assert seen == configs
    assert tuning.autotune(key, lambda: None, configs, timer) == Tile(64, 64, 4)
    assert len(seen) == 3  # cached: nothing timed again
    with pytest.raises(RuntimeError, match="out of resources: shared memory") as failed:
        tuning.autotune(("lsh",), lambda: None, [Tile(32, 32, 4), Tile(16, 16, 4)], timer)
    assert failed.value.__notes__ == [
        "tuning: no tile ran for lsh: 32x32 w4 s3: RuntimeError: out of resources: shared "
        "memory; 16x16 w4 s3: RuntimeError: out of resources: shared memory"
    ]


def test_tune_key_rounds_the_length_and_names_the_config():
    q = torch.empty(1, 2, 1500, 64, dtype=torch.float16)
    key = tuning.tune_key("xl", {"segment_len": 512}, q, True)
    assert key == ("xl", (("segment_len", "512"),), 64, "torch.float16", True, 2048)


def test_off_the_gpu_calls_run_untuned(monkeypatch):
    def no_tuning(*args, **kwargs):
        raise AssertionError("autotuned off the GPU")

    monkeypatch.setattr(tuning, "autotune", no_tuning)
    q = torch.empty(1, 1, 8, 32)
    assert tuning.tuned_call("plain", "dense", {}, True, q, lambda: "ran") == "ran"


def test_triton_impls_run_through_the_tuner():
    impl = attn_zoo.get("dense").impl("triton")
    assert impl.runner is not None
    assert attn_zoo.get("dense").impl("reference").runner is None


@pytest.mark.parametrize(
    "layout",
    [
        build_layout(300, 300, Band(lo=0), block_m=128, block_n=64),
        build_layout(300, 300, Band(lo=0, hi=100), block_m=64, block_n=64),
        build_layout(256, 256, Band(lo=0), Window(64, 64, -64, 63), block_m=64, block_n=32),
    ],
    ids=["causal", "band", "memory window"],
)
def test_band_and_window_layouts_are_runs(layout):
    assert layout.full_runs
    assert layout.by_key.full_runs


def test_scattered_full_blocks_are_not_a_run():
    packed = torch.tensor([[[0, 1, -1], [0, 2, -1], [-1, -1, -1]]], dtype=torch.int32)
    assert layout_module._runs(packed[:, [0, 2]], torch.tensor([[2, 0]]))
    assert not layout_module._runs(packed, torch.tensor([[2, 2, 0]]))  # row 1: blocks 0, 2


# The tiles a GPU launch runs, in the interpreter: 128-row and rectangular blocks, wider
# or taller (the backward's programs then split each layout block; 64 x 128 is xl's at
# head_dim 128), a forward that walks each key block in two steps (an autotuner
# candidate) and one whose masked walk takes two blocks a step where the lists allow
# (lsh's), forward and gradients.
GPU_TILES = [Tile(128, 128, 8), Tile(128, 64, 4), Tile(64, 128, 4, 2), Tile(64, 32, 4),
             Tile(64, 64, 8, step_n=32), Tile(32, 32, 4, step_n=64)]  # fmt: skip


@pytest.mark.parametrize("tile", GPU_TILES, ids=str)
@pytest.mark.parametrize("name", ["dense", "sparse_strided", "sparse_fixed", "adaptive_span",
                                  "compressive", "routing"])  # fmt: skip
def test_gpu_tiles_match_reference_and_oracle(name, tile):
    _same_outputs(name, tile, 150, causal=True)


@pytest.mark.parametrize("tile", GPU_TILES, ids=str)
@pytest.mark.parametrize("name", ["xl", "lsh"])
def test_gpu_tiles_for_xl_and_lsh(name, tile):
    """xl's feature products and lsh's earlier rounds at every candidate tile."""
    _same_outputs(name, tile, 100, causal=False)


@pytest.mark.parametrize("tile", GPU_TILES, ids=str)
@pytest.mark.parametrize("name", ["dense", "sparse_fixed", "adaptive_span", "routing", "xl"])
def test_gpu_tiles_give_the_reference_gradients(name, tile):
    _same_gradients(name, tile)


@pytest.mark.parametrize("name", ["dense", "xl"])
def test_head_dim_128_backward_programs_give_the_reference_gradients(name):
    """At head_dim 128 a band alone walks dK/dV 64 query rows a step, xl's dQ programs
    hold 64 rows of a 128-row block: the programs only these take."""
    tile = Tile(128, 128, 8)
    kind = "dense" if name == "dense" else "relative"
    back = tuning.backward_tile(128, torch.float16, kind, tile)
    assert back.of("bwd_dkdv")[1] == (64 if name == "dense" else 32)
    assert back.of("bwd_dq")[0] == (128 if name == "dense" else 64)
    _same_gradients(name, tile, dim=128)


# The own walk (blocks holding i == j under a self bias) in narrower steps than the
# other walks, as adaptive span's bidirectional tile runs it at head_dim 128.
OWN_STEP_TILES = [Tile(128, 128, 8, own_step_n=64), Tile(64, 64, 4, own_step_n=32)]


@pytest.mark.parametrize("tile", OWN_STEP_TILES, ids=str)
@pytest.mark.parametrize("name", ["adaptive_span", "sparse_strided", "lsh"])
def test_own_walk_in_narrower_steps_matches_reference_and_oracle(name, tile):
    _same_outputs(name, tile, 150, causal=False)


@pytest.mark.parametrize("tile", OWN_STEP_TILES, ids=str)
@pytest.mark.parametrize("name", ["adaptive_span", "sparse_strided"])
def test_own_walk_in_narrower_steps_gives_the_reference_gradients(name, tile):
    _same_gradients(name, tile, causal=False)


@pytest.mark.parametrize("fields,message", [
    (dict(step_n=48), "step_n 48 with block_n 128; accepted: None, or 16 or more dividing "
                      "block_n, or a multiple of it"),
    (dict(step_n=192), "step_n 192 with block_n 128; accepted: None, or 16 or more"),
    (dict(own_step_n=8), "own_step_n 8 with block_n 128; accepted: None, or 16 or more"),
    (dict(own_step_n=256), "own_step_n 256 with block_n 128; accepted: None, or 16 or more "
                           "dividing block_n$"),
])  # fmt: skip
def test_a_step_that_does_not_divide_the_block_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Tile(128, 128, 8, **fields)


def test_a_step_of_several_blocks_applies_to_the_masked_walk_only():
    """step_n a multiple of block_n: the masked walk takes that many blocks a step, the
    full and own walks one block at most; lsh's tile, kept by the interpreter's tile,
    and walked a block a step by a round under its self test or testing more earlier
    rounds than its head_dim leaves registers for (at 128 the last of 4 spills 60
    bytes with Triton 3.9)."""
    tile = Tile(64, 64, 4, step_n=128)
    assert (tile.span, tile.step, tile.full_step, tile.own_step) == (2, 128, 64, 64)
    assert tile.in_blocks() == Tile(64, 64, 4) and Tile(64, 64, 4).in_blocks().span == 1
    assert tuning.default_tile(64, torch.float16, "duplicates") == tile
    assert tuning.default_tile(128, torch.float16, "duplicates").span == 2
    assert tuning.interpreter_tile(64, torch.float32, "duplicates") == Tile(64, 64, 4, 1, 128)
    walked = [tuning.masked_walk_tile(tile, 128, r == 0, r).span for r in range(4)]
    assert walked == [1, 2, 2, 1]  # round 0 tests i == j, round 3 three earlier rounds
    assert [tuning.masked_walk_tile(tile, 64, False, r).span for r in (6, 7)] == [2, 1]
    assert tuning.masked_walk_tile(tile, 32, False, 7).span == 2


@pytest.mark.parametrize("kind", tuning.KINDS)
@pytest.mark.parametrize("dim", [16, 32, 64, 128])
def test_float32_backward_programs_divide_every_float32_tile(dim, kind):
    """The backward's programs split the forward's layout blocks, whichever float32
    tile the autotuner picks."""
    back = tuning.backward_tile(dim, torch.float32, kind, tuning.float32_tile(dim, kind))
    for tile in tuning.candidates(dim, torch.float32, kind):
        for kernel in ("bwd_dq", "bwd_dkdv"):
            program, step, _, _ = back.of(kernel)
            for block in tile.blocks:
                assert block % program == 0 and block % step == 0, (tile, back, kernel)


@pytest.mark.parametrize("kind", tuning.KINDS)
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_mma_backward_programs_divide_the_forward_tile_they_follow(dim, kind):
    """fp16/bf16's backward programs follow the forward's tile, whichever candidate the
    autotuner picks: dQ rows and dK/dV keys split its query and key blocks, and each
    pass's steps the other block, so a full block's pieces are full."""
    for tile in tuning.candidates(dim, torch.float16, kind):
        back = tuning.backward_tile(dim, torch.bfloat16, kind, tile)
        rows, keys_step, _, _ = back.of("bwd_dq")
        keys, rows_step, _, _ = back.of("bwd_dkdv")
        assert tile.block_m % rows == 0 and tile.block_n % keys_step == 0, (tile, back)
        assert tile.block_n % keys == 0 and tile.block_m % rows_step == 0, (tile, back)


@pytest.fixture
def gpu_tiles():
    """Launches in the interpreter take the tiles (and backward programs) a GPU runs."""
    token = tuning.GPU_TILES.set(True)
    yield
    tuning.GPU_TILES.reset(token)


@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("name", ["dense", "sparse_strided", "adaptive_span", "xl", "lsh",
                                  "routing"])  # fmt: skip
def test_float32_gpu_tiles_match_reference_oracle_and_gradients(name, dim, gpu_tiles):
    """float32's own tiles (:func:`tuning.float32_tile`: 64 x 32, 32 x 32 and 32 x 64)
    and backward programs (16 and 32 rows or keys in steps of 16), which the
    interpreter does not run by default."""
    q = torch.empty(1, 1, 1, dim)
    kind = "duplicates" if name == "lsh" else "plain"
    assert tuning.tile_for(q, kind) == tuning.float32_tile(dim, kind)
    assert tuning.backward_tile_for(q, kind, tuning.tile_for(q)).of("bwd_dkdv")[1] == 16
    check_impl(small(name), "triton", 100, dim, torch.float32, name != "lsh")
    _same_gradients(name, None, causal=name != "lsh", dim=dim)


def _same_outputs(name, tile, n, causal):
    """The triton impl on ``tile`` against the reference and the float64 oracle."""
    with tuning.use_tile(tile):
        check_impl(small(name), "triton", n, 32, torch.float32, causal)


def _same_gradients(name, tile, causal=True, dim=32):
    """The triton impl's gradients on ``tile`` (None: the tile a launch takes) against
    the reference's."""
    mech = small(name)
    q, k, v = (torch.randn(1, 2, 150, dim, dtype=torch.float64).float().requires_grad_()
               for _ in range(3))  # fmt: skip
    plan = mech.plan(q, k, v, causal)
    upstream = torch.randn(1, 2, 150, dim)
    with tuning.use_tile(tile) if tile else contextlib.nullcontext():
        mine = torch.autograd.grad(mech(q, k, v, causal, "triton", plan), (q, k, v), upstream,
                                   allow_unused=True)  # fmt: skip
    reference = torch.autograd.grad(mech(q, k, v, causal, "reference", plan), (q, k, v),
                                    upstream, allow_unused=True)  # fmt: skip
    for got, want in zip(mine, reference, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_row_offsets_widen_past_two_to_the_31_elements():
    from attn_zoo.kernels.flash import wide_offsets

    heads_inside = torch.empty(1, 16, 2**21, 128, device="meta", dtype=torch.float16)
    assert not wide_offsets(heads_inside)  # 2^28 elements per head
    tokens_outside = torch.empty(1, 2**21, 16, 128, device="meta", dtype=torch.float16)
    assert wide_offsets(tokens_outside.transpose(1, 2))  # row stride 16 x 128


@pytest.mark.parametrize("name", ["dense", "lsh", "xl"])
def test_int64_row_offsets_give_the_same_result(name, monkeypatch):
    """The WIDE flag's int64 strides, forced on at small N."""
    monkeypatch.setattr(attn_zoo.kernels.flash, "OFFSET_LIMIT", 1)
    check_impl(small(name), "triton", 100, 32, torch.float32, True)
    q, k, v = (torch.randn(1, 2, 70, 32, requires_grad=True) for _ in range(3))
    mech = small(name)
    plan = mech.plan(q, k, v, True)
    got = torch.autograd.grad(mech(q, k, v, True, "triton", plan).sum(), q)[0]
    want = torch.autograd.grad(mech(q, k, v, True, "reference", plan).sum(), q)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_tuned_call_on_cuda_runs_and_records_the_fastest_candidate(monkeypatch):
    """tuned_call's CUDA path with a stand-in for q (only its device, shape and dtype
    are read) and a timer that prefers 64 x 64 with 4 warps."""
    from types import SimpleNamespace

    chosen: dict = {}
    monkeypatch.setattr(tuning, "CHOSEN", chosen)

    def timer(call):
        call()
        return 1.0 if tuning._FORCED.get() == Tile(64, 64, 4) else 2.0

    monkeypatch.setattr(tuning, "_time", timer)
    q = SimpleNamespace(device=SimpleNamespace(type="cuda"), shape=(1, 8, 1000, 64),
                        dtype=torch.float16)  # fmt: skip
    ran = []
    out = tuning.tuned_call("plain", "sparse_fixed", {"stride": 128}, True, q,
                            lambda: ran.append(tuning._FORCED.get()) or "out")  # fmt: skip
    assert out == "out"
    assert ran[-1] == Tile(64, 64, 4) == tuning.last_tile()
    assert len(ran) == len(tuning.candidates(64, torch.float16, "plain")) + 1
    key = ("sparse_fixed", (("stride", "128"),), 64, "torch.float16", True, 1024)
    assert chosen == {key: Tile(64, 64, 4)}
    monkeypatch.setattr(tuning, "candidates", None)  # a tuned key lists none again
    tuning.tuned_call("plain", "sparse_fixed", {"stride": 128}, True, q,
                      lambda: ran.append(tuning._FORCED.get()))  # fmt: skip
    assert ran[-1] == Tile(64, 64, 4)
    monkeypatch.setenv("ATTN_ZOO_AUTOTUNE", "0")  # off: the default tile, nothing timed
    assert tuning.tuned_call("plain", "dense", {}, True, q, lambda: tuning._FORCED.get()) is None


def test_backward_stages_follow_the_compiler():
    tile = tuning.default_tile(128, torch.float16, "relative")
    # xl's dK/dV at head_dim 128: 1 stage with Triton 3.9, 2 with 3.6 (the GPU image's)
    old = tuning.backward_tile(128, torch.float16, "relative", tile, triton=(3, 6))
    new = tuning.backward_tile(128, torch.float16, "relative", tile, triton=(3, 9))
    assert (old.stages, old.stages_dq) == (2, 2)
    assert (new.stages, new.stages_dq) == (1, 2)
    dense = tuning.default_tile(128, torch.float16)
    plain = tuning.backward_tile(128, torch.float16, "plain", dense)
    assert (plain.stages, plain.stages_dq) == (2, 3)
    # a band alone walks 64 query rows a step in dK/dV at 128; any other rule 32
    assert tuning.backward_tile(128, torch.float16, "dense", dense).of("bwd_dkdv")[:2] == (128, 64)
    assert plain.of("bwd_dkdv")[:2] == (128, 32) and plain.of("bwd_dq")[:3] == (128, 64, 8)
    # at 64, Triton 3.6 spills in dK/dV's steps of 32 but for a band: 16 there
    at_64 = tuning.default_tile(64, torch.float16)
    assert tuning.backward_tile(64, torch.float16, "plain", at_64, triton=(3, 6)).step == 16
    assert tuning.backward_tile(64, torch.float16, "plain", at_64, triton=(3, 9)).step == 32
    assert tuning.backward_tile(64, torch.float16, "dense", at_64, triton=(3, 6)).step == 32
    major, minor = tuning.triton_version()
    assert (major, minor) >= (3, 6)
    # float32's dK/dV at head_dim 128: 2 stages spill with Triton 3.9, 1 with 3.6
    fp32 = tuning.default_tile(128, torch.float32)
    assert tuning.backward_tile(128, torch.float32, "plain", fp32, triton=(3, 9)).stages == 1
    assert tuning.backward_tile(128, torch.float32, "plain", fp32, triton=(3, 6)).stages == 2
    # and at 32 (lsh's transposed dK/dV tiles: 3.9 spills 32 bytes with 2, 3.6 8 with 1)
    fp32 = tuning.default_tile(32, torch.float32)
    assert tuning.backward_tile(32, torch.float32, "duplicates", fp32, triton=(3, 9)).stages == 1
    assert tuning.backward_tile(32, torch.float32, "duplicates", fp32, triton=(3, 6)).stages == 2


def test_tuned_tiles_go_to_the_tiles_file_and_a_later_process_reads_them(monkeypatch, tmp_path):
    """With ATTN_ZOO_TILES, a choice is appended to the file with the GPU's name, and
    a process that starts later (its chosen tiles empty) runs the stored tile
    without timing a candidate; another GPU's line, or a line cut short, is not
    read as this one's."""
    from types import SimpleNamespace

    path = tmp_path / "tiles.jsonl"
    monkeypatch.setenv("ATTN_ZOO_TILES", str(path))
    monkeypatch.setattr(tuning, "CHOSEN", {})
    monkeypatch.setattr(tuning, "_STORED", {})
    monkeypatch.setattr(tuning, "device_name", lambda device: "H100 | triton 3.6")
    monkeypatch.setattr(tuning, "_time", lambda call: 1.0 if tuning._FORCED.get() ==
                        Tile(64, 64, 4) else 2.0)  # fmt: skip
    q = SimpleNamespace(device=SimpleNamespace(type="cuda"), shape=(1, 8, 1000, 64),
                        dtype=torch.float16)  # fmt: skip
    tuning.tuned_call("plain", "dense", {}, True, q, lambda: None)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and '"device": "H100 | triton 3.6"' in lines[0]
    key = tuning.tune_key("dense", {}, q, True)
    with path.open("a") as f:  # another GPU's choice for the same key, and a torn line
        f.write(lines[0].replace("H100", "A100").replace('"block_m": 64', '"block_m": 128')
                + "\n" + lines[0][:20] + "\n")  # fmt: skip
    monkeypatch.setattr(tuning, "CHOSEN", {})  # a new process
    monkeypatch.setattr(tuning, "_STORED", {})
    monkeypatch.setattr(tuning, "candidates", None)  # timing anything would fail
    ran = []
    tuning.tuned_call("plain", "dense", {}, True, q, lambda: ran.append(tuning._FORCED.get()))
    chosen = dict(tuning.CHOSEN)
    assert ran == [Tile(64, 64, 4)] and chosen == {key: Tile(64, 64, 4)}
    assert len(path.read_text().splitlines()) == 3  # read, not stored again
