"""Every reduction preset under mixed precision (``torch.autocast``, bf16 on CPU here; CUDA's
bf16 and fp16 take the same code): inference and a training step run, give finite outputs of the
fp32 model's shapes, and the unreduced model stays within bf16 rounding of fp32.

Before the scoring ops kept float32 under autocast, every preset with a bipartite or window
score (``fatr``, ``tome``, ``algm``, ``random``) raised inside autocast, in eval and in training
(mmseg's ``AmpOptimWrapper``).
"""

import pytest
import torch

from fatr_seg.layers import PRESETS, FATRVisionTransformer

pytestmark = pytest.mark.usefixtures("single_thread")


def build(method, compact_output):
    torch.manual_seed(0)
    return FATRVisionTransformer(
        img_size=128, patch_size=16, embed_dims=64, num_layers=12, num_heads=2,
        reduction=None if method is None else dict(method=method), compact_output=compact_output,
    )  # fmt: skip


def first(out):
    return out[0] if isinstance(out[0], torch.Tensor) else out[0].tokens


@pytest.mark.parametrize("method", [None, *sorted(PRESETS)])
@pytest.mark.parametrize("compact_output", [True, False])
def test_inference_under_autocast(method, compact_output):
    model = build(method, compact_output).eval()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = first(model(x))
        with torch.autocast("cpu", torch.bfloat16):
            got = first(model(x))
    assert got.shape == want.shape and got.isfinite().all()
    if method is None:
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("method", [None, *sorted(PRESETS)])
def test_training_step_under_autocast(method):
    model = build(method, compact_output=False).train()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(x)[0].float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.isfinite().all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", [None, "fatr", "fatr_paper"])
def test_fullgraph_trace_under_autocast(method):
    """Dynamo traces the autocast forward as one graph and gives eager's selection and tokens.

    (On the H200 machine's torch 2.11 the float32 products' autocast switch, written as a context
    manager chosen at run time, broke the graph; torch 2.14 here traces either form, so this
    test guards the graph as a whole, and ``test_cuda_model.py`` the CUDA compile.)"""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = build(method, compact_output=True).eval()
    counter = CompileCounter()
    fn = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got, want = fn(x), model(x)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.source, b.source)
        torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    assert counter.frame_count == 1
    torch._dynamo.reset()
