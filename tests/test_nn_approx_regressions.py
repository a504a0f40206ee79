"""Regressions of the approx* variants (issue 13 items 7 and 9).

- Stochastic rounding draws no number from torch's generator (dropout after
  conversion draws BP's masks).
- Huge finite activations (fp16 scale overflow) give finite gradients.
- Unbatched inputs of LayerNorm and Conv1d/Conv2d run backward.
- torch.func.grad and vmap work on converted models (plain forward under a transform).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aalconvert
from aalconvert.errors import ConversionError
from aalconvert.nn.approx import ApproxConv1d, ApproxConv2d, ApproxLayerNorm
from aalconvert.nn.approx_common import ApproxOptions, compress, functorch_active, restore


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ------------------------------------------------------------------ RNG


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(64, 64), nn.GELU(), nn.Dropout(0.5), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


@pytest.mark.parametrize("rule", ["approx4", "approx2"])
def test_stochastic_rounding_leaves_torch_rng_alone_and_dropout_draws_bps_masks(rule):
    torch.manual_seed(0)
    model = WithDropout()
    converted = aalconvert.convert(model, rule, stochastic=True, min_numel=0)
    x = torch.randn(32, 64)

    no_dropout = nn.Sequential(model.fc1, model.act, model.fc2)
    converted_no_dropout = aalconvert.convert(no_dropout, rule, stochastic=True, min_numel=0)
    state = torch.get_rng_state()
    converted_no_dropout(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)

    torch.manual_seed(123)
    expected = [model(x) for _ in range(3)]
    torch.manual_seed(123)
    actual = [converted(x) for _ in range(3)]
    for e, a in zip(expected, actual):  # exact forward: equal outputs mean equal dropout masks
        assert torch.equal(e, a)


def test_stochastic_copies_differ_between_calls_and_stay_unbiased():
    options = ApproxOptions(bits=2, stochastic=True, min_numel=0)
    x = torch.rand(4096, generator=torch.Generator().manual_seed(1))
    decoded = []
    for _ in range(64):
        saved, layout = compress(x, options)
        decoded.append(restore(saved, layout))
    assert not torch.equal(decoded[0], decoded[1])
    mean = torch.stack(decoded).mean(0)
    step = (x.max() - x.min()) / 3
    # per element: 64 draws, std <= step / 2 / 8; the mean error over 4096 elements is far smaller.
    assert (mean - x).abs().mean() < step / 16
    assert (mean - x).mean().abs() < step / 200


# ------------------------------------------------------------------ huge values


def _layer(kind):
    torch.manual_seed(3)
    return {
        "linear": lambda: nn.Linear(64, 32),
        "gelu": lambda: nn.GELU(),
        "silu": lambda: nn.SiLU(),
        "layernorm": lambda: nn.LayerNorm(64),
        "conv1d": lambda: nn.Conv1d(4, 8, 3, padding=1),
    }[kind]()


def _input(kind, value):
    shape = (4, 16) if kind == "conv1d" else (64,)
    x = torch.randn(128, *shape, generator=torch.Generator().manual_seed(4))
    x.view(-1)[[5, 700, 3001]] = value
    return x


def _grads(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    params = [p for p in module.parameters()]
    return y, torch.autograd.grad((y * g).sum(), [x, *params])


@pytest.mark.parametrize("value", [1e10, -1e10, -7e4, 3e38])
@pytest.mark.parametrize("options", [{}, {"stochastic": True}, {"companding": "none"}], ids=str)
@pytest.mark.parametrize("kind", ["linear", "gelu", "silu", "layernorm", "conv1d"])
def test_huge_finite_activations_give_finite_gradients_close_to_bp(kind, options, value):
    module = _layer(kind)
    converted = aalconvert.convert(nn.Sequential(module), "approx4", min_numel=0, **options)[0]
    assert type(converted) is not type(module)
    x = _input(kind, value)
    y_bp = module(x)
    g = torch.randn(y_bp.shape, generator=torch.Generator().manual_seed(5)) * 0.1
    _, expected = _grads(module, x, g)
    _, actual = _grads(converted, x, g)
    for e, a in zip(expected, actual):
        finite = e.isfinite()
        assert a[finite].isfinite().all()
        if e[finite].abs().max() > 0:
            assert cosine(a[finite], e[finite]) > 0.95


def test_scale_dtype_reaches_the_variants_through_convert_and_is_validated():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    converted = aalconvert.convert(model, "approx4", scale_dtype=torch.bfloat16)
    assert converted[0].approx_options.scale_dtype == torch.bfloat16
    converted = aalconvert.convert(model, "approx8", scale_dtype="float16")
    assert converted[1].approx_options.scale_dtype == torch.float16
    assert aalconvert.convert(model, "approx2")[0].approx_options.scale_dtype == torch.float16
    with pytest.raises(ConversionError, match=r"scale_dtype must be one of .*float16.*bfloat16"):
        aalconvert.convert(model, "approx4", scale_dtype=torch.float32)
    with pytest.raises(ConversionError, match="scale_dtype must be one of"):
        ApproxOptions(scale_dtype="fp8")


# ------------------------------------------------------------------ unbatched inputs


@pytest.mark.parametrize(
    "torch_module, variant, shape",
    [
        (lambda: nn.LayerNorm(96), ApproxLayerNorm, (96,)),
        (lambda: nn.LayerNorm([3, 32]), ApproxLayerNorm, (3, 32)),
        (lambda: nn.Conv1d(3, 4, 3), ApproxConv1d, (3, 40)),
        (lambda: nn.Conv2d(3, 4, 3, padding=1), ApproxConv2d, (3, 8, 8)),
        (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), ApproxConv2d, (3, 8, 8)),
    ],
)
@pytest.mark.parametrize("bits", [8, 4])
def test_unbatched_inputs_run_backward_like_a_batch_of_one(torch_module, variant, shape, bits):
    torch.manual_seed(6)
    module = torch_module()
    approx = variant.from_module(module, bits=bits, min_numel=0)
    x = torch.randn(shape)
    g = torch.randn(module(x).shape)
    y, actual = _grads(approx, x, g)
    assert torch.equal(y, module(x))
    _, batched = _grads(approx, x.unsqueeze(0), g.unsqueeze(0))
    _, expected = _grads(module, x, g)
    for a, b, e in zip(actual, batched, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-5, atol=1e-6)
        assert cosine(a, e) > (0.999 if bits == 8 else 0.98)


# ------------------------------------------------------------------ torch.func


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.act = nn.GELU()
        self.silu = nn.SiLU()
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm1d(8)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        h = self.bn(self.relu(self.conv(x)))
        h = self.act(self.fc(self.norm(h)))
        return self.softmax(self.silu(h)).sum(1)


def test_functorch_active_only_inside_a_transform():
    x = torch.ones(3)
    seen = []
    torch.func.grad(lambda t: (seen.append(functorch_active(t)), t.sum())[1])(x)
    torch.func.vmap(lambda t: (seen.append(functorch_active(t)), t.sum())[1])(x)
    assert seen == [True, True] and not functorch_active(x)


@pytest.mark.parametrize("rule", ["approx8", "approx4", "approx2"])
def test_torch_func_grad_and_vmap_match_the_plain_model(rule):
    torch.manual_seed(7)
    model = Small().eval()  # eval: batch norm leaves running stats alone under functional_call
    converted = aalconvert.convert(model, rule, min_numel=0)
    assert any(type(m).__name__.startswith("Approx") for m in converted.modules())
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(6, 4, 16)

    def loss(module):
        return lambda p, inp: torch.func.functional_call(module, (p, buffers), (inp,)).square().sum()

    expected = torch.func.grad(loss(model))(params, x)
    actual = torch.func.grad(loss(converted))(params, x)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)

    assert torch.equal(torch.func.vmap(converted)(x.unsqueeze(1)), torch.func.vmap(model)(x.unsqueeze(1)))
    per_sample = torch.func.vmap(torch.func.grad(loss(converted)), in_dims=(None, 0))
    reference = torch.func.vmap(torch.func.grad(loss(model)), in_dims=(None, 0))
    xs = x.unsqueeze(1)
    for name, value in per_sample(params, xs).items():
        torch.testing.assert_close(value, reference(params, xs)[name], rtol=1e-5, atol=1e-6)

    # outside a transform the converted model still keeps k-bit copies: gradients differ from BP
    x.requires_grad_()
    converted(x).square().sum().backward()
    assert converted.fc.weight.grad is not None
