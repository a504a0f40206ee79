"""1-bit packing: the reference layout, exact round trips, and Triton and the CPU path held to it byte for byte.

Without CUDA the Triton kernels run in the interpreter (tests/conftest.py).
``backend="auto"`` on a CPU tensor runs the CPU path (numpy's packbits).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from aalconvert.kernels import pack_bits, packed_nbytes, unpack_bits

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool)
DECODINGS = ("bool", "binary", "sign")


def awkward_tensor(shape, dtype, seed=0):
    """Random values with the edge cases of ``> 0`` mixed in: 0, -0.0, NaN, +-inf."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    flat = x.view(-1)
    specials = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf])
    flat[: min(5, flat.numel())] = specials[: flat.numel()]
    return x > 0 if dtype == torch.bool else x.to(dtype)


def assert_backends_agree(x: torch.Tensor) -> torch.Tensor:
    packed = pack_bits(x, backend="reference")
    for backend in ("triton", "auto"):
        assert torch.equal(pack_bits(x, backend=backend), packed)
        for decode in DECODINGS:
            for dtype in (torch.float32, torch.bfloat16):
                options = dict(decode=decode, dtype=dtype)
                other = unpack_bits(packed, x.shape, backend=backend, **options)
                reference = unpack_bits(packed, x.shape, backend="reference", **options)
                assert other.dtype == reference.dtype and torch.equal(other, reference)
    return packed


def test_layout_puts_element_i_at_bit_i_mod_8_of_byte_i_div_8():
    x = torch.tensor([1.0, -1, -1, 1, -1, -1, -1, -1, 1, 1])
    assert pack_bits(x).tolist() == [0b00001001, 0b00000011]


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_every_byte_value_packs_and_unpacks_bit_by_bit(backend):
    # All 256 patterns of eight elements, against a bit-by-bit definition of the layout.
    patterns = [[(value >> bit) & 1 == 1 for bit in range(8)] for value in range(256)]
    bits = torch.tensor(patterns).reshape(-1)
    assert pack_bits(bits, backend=backend).tolist() == list(range(256))
    assert unpack_bits(torch.arange(256, dtype=torch.uint8), bits.shape, backend=backend).tolist() == bits.tolist()
    shifted = torch.cat([torch.ones(3, dtype=torch.bool), bits])[3:]  # a view whose storage starts mid-word
    assert pack_bits(shifted, backend=backend).tolist() == list(range(256))


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 513, 10**5 + 3])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_triton_matches_reference_bytes_over_sizes(numel, dtype):
    packed = assert_backends_agree(awkward_tensor((numel,), dtype))
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel) == -(-numel // 8)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    dtype=st.sampled_from(INPUT_DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
)
def test_triton_matches_reference_bytes_property(shape, dtype, layout):
    x = awkward_tensor(shape, dtype, seed=len(shape))
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1)
    elif layout == "strided":
        every_other = tuple(slice(None, None, 2) for _ in shape)
        x = awkward_tensor([2 * d for d in shape], dtype)[every_other]
    assert_backends_agree(x)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_an_empty_strided_view_packs_to_no_bytes(dtype):
    # found by the property test above: reshape(-1) keeps an empty view's stride of 2
    x = awkward_tensor((0, 2), dtype)[:, 0]
    assert assert_backends_agree(x).numel() == 0


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
def test_channels_last_and_transposed_inputs_pack_in_logical_order(backend):
    x = awkward_tensor((2, 3, 5, 7), torch.float16)
    expected = pack_bits(x.contiguous(), backend="reference")
    channels_last = x.to(memory_format=torch.channels_last)
    assert torch.equal(pack_bits(channels_last, backend=backend), expected)
    transposed = x.transpose(1, 3).contiguous().transpose(1, 3)
    assert torch.equal(pack_bits(transposed, backend=backend), expected)


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_round_trip_is_exact_for_every_decoding(backend, dtype):
    x = awkward_tensor((3, 7, 11), dtype)
    positive = x if dtype == torch.bool else x > 0
    packed = pack_bits(x, backend=backend)
    as_bool = unpack_bits(packed, x.shape, backend=backend)
    assert as_bool.dtype == torch.bool and torch.equal(as_bool, positive)
    binary = unpack_bits(packed, x.shape, decode="binary", dtype=torch.float16, backend=backend)
    assert binary.dtype == torch.float16 and torch.equal(binary, positive.half())
    sign = unpack_bits(packed, x.shape, decode="sign", dtype=torch.bfloat16, backend=backend)
    assert torch.equal(sign, torch.where(positive, 1.0, -1.0).bfloat16())
    assert sign.is_contiguous()


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
def test_unused_high_bits_of_last_byte_are_zero(backend):
    assert pack_bits(torch.ones(11, dtype=torch.bool), backend=backend).tolist() == [255, 7]


def test_bad_inputs_are_rejected_with_clear_errors():
    with pytest.raises(TypeError, match="bool or floating-point"):
        pack_bits(torch.ones(8, dtype=torch.int32))
    packed = pack_bits(torch.ones(16))
    with pytest.raises(ValueError, match="decode must be one of"):
        unpack_bits(packed, (16,), decode="signed")
    with pytest.raises(ValueError, match="cannot hold shape"):
        unpack_bits(packed, (17,))
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(packed.to(torch.int16), (16,))
    with pytest.raises(ValueError, match="backend must be one of"):
        pack_bits(torch.ones(8), backend="cuda")


def test_pack_and_unpack_run_on_fake_tensors_with_the_right_shapes():
    with FakeTensorMode():
        x = torch.empty(4, 3, 513, dtype=torch.float16)
        packed = pack_bits(x)
        signs = unpack_bits(packed, x.shape, decode="sign", dtype=torch.float16)
        mask = unpack_bits(packed, x.shape)
    assert packed.shape == (math.ceil(4 * 3 * 513 / 8),) and packed.dtype == torch.uint8
    assert signs.shape == x.shape and signs.dtype == torch.float16
    assert mask.shape == x.shape and mask.dtype == torch.bool


def test_ops_pass_torch_library_checks():
    x = awkward_tensor((3, 37), torch.float32)
    torch.library.opcheck(
        torch.ops.aalconvert.pack_bits.default,
        (x, "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.aalconvert.unpack_bits.default,
        (pack_bits(x), [3, 37], "sign", torch.float32, "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_pack_compiles_into_one_graph_without_breaks():
    def signs_of(x):
        return unpack_bits(pack_bits(x), x.shape, decode="sign")

    compiled = torch.compile(signs_of, backend="eager", fullgraph=True)
    x = awkward_tensor((5, 13), torch.float32)
    assert torch.equal(compiled(x), signs_of(x))
